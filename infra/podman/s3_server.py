"""An S3 server for the local compose override (infra/podman/compose.local.yaml), in place of
MinIO: moto's server, whose objects are saved to a folder (the service's volume) when it stops
and put back when it starts, as infra/local_stack.py does for `make stack-up`.

    python s3_server.py serve --port 9000 --data /data
    python s3_server.py make-bucket --endpoint http://minio:9000 BUCKET

A container stopped with SIGTERM/SIGINT (`podman-compose down`, `podman stop`) keeps its
objects; one killed (SIGKILL, a crash) loses what was written since it started. moto accepts
any credentials.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from local_stack import _s3, restore_objects, save_objects  # noqa: E402


def serve(port: int, data: Path) -> int:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="0.0.0.0", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = data / "objects"
    print(f"S3 (moto) on :{port}; restored {restore_objects(endpoint, saved)} objects", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    print(f"stopping: saved {save_objects(endpoint, saved)} objects to {saved}", flush=True)
    server.stop()
    return 0


def make_bucket(endpoint: str, bucket: str, timeout_s: float) -> int:
    """Create `bucket` (kept if it exists), waiting up to `timeout_s` for the server."""
    client = _s3(endpoint)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            names = {b["Name"] for b in client.list_buckets()["Buckets"]}
            break
        except Exception as exc:  # the server is still starting
            if time.monotonic() > deadline:
                print(f"{endpoint} did not answer within {timeout_s:.0f} s: {exc}")
                return 1
            time.sleep(1)
    if bucket not in names:
        client.create_bucket(Bucket=bucket)
    print(f"bucket {bucket} ready at {endpoint}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("serve", help="run the server; save objects to DATA on SIGTERM")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--data", type=Path, default=Path("/data"))
    p = sub.add_parser("make-bucket", help="create a bucket once the server answers")
    p.add_argument("--endpoint", required=True)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("bucket")
    args = parser.parse_args()
    if args.cmd == "serve":
        return serve(args.port, args.data)
    return make_bucket(args.endpoint, args.bucket, args.timeout)


if __name__ == "__main__":
    sys.exit(main())
