"""The team stack without Docker, on 127.0.0.1: an S3-protocol server (moto), `mlflow server`
(SQLite backend, artifacts proxied to S3) and `prefect server`, for this machine and CI.

    python infra/local_stack.py up      # or: make stack-up
    python infra/local_stack.py status
    python infra/local_stack.py down    # or: make stack-down

`up` writes `.stack/env` (KEY=VALUE lines) pointing the pipeline at the stack; `make run`
reads it, so a retrain registers on the stack's MLflow and pushes data to the stack's S3.
What the stack keeps lives in `.stack/` (git-ignored) and survives `down` and `up`: the MLflow
and Prefect databases, the logs, and the S3 objects (MLflow artifacts, DVC data). The S3 server
(moto) holds its objects in memory, so `down` saves every object to `.stack/s3/<bucket>/<key>`
before it stops the server, and `up` puts them back: a registered model's artifacts outlive a
restart. A stack killed without `down` (a crash, a reboot) loses the objects written since the
last `down`; infra/compose.yaml (MinIO on a volume) is for keeping. The S3 credentials are fixed
local values, not secrets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.error import URLError
from urllib.request import urlopen

BUCKET = "vae-pipeline"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "stack-local",
    "AWS_SECRET_ACCESS_KEY": "stack-local-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}
DEFAULT_PORTS = {"s3": 9100, "mlflow": 5000, "prefect": 4200}
QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _wait(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {proc.returncode}; see its log")
        with contextlib.suppress(URLError, OSError), urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{url} did not answer within {timeout:.0f} s; see the log in .stack/")


def _s3(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def save_objects(endpoint: str, dest: Path) -> int:
    """Every object of every bucket to dest/<bucket>/<key>, replacing what dest held (written
    beside it first, so a failure keeps the previous copy); returns the count."""
    client = _s3(endpoint)
    staging = dest.with_name(dest.name + ".saving")
    shutil.rmtree(staging, ignore_errors=True)
    count = 0
    for bucket in client.list_buckets()["Buckets"]:
        root = (staging / bucket["Name"]).resolve()
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
            for obj in page.get("Contents", []):
                path = (root / obj["Key"]).resolve()
                if not path.is_relative_to(root) or obj["Key"].endswith("/"):
                    print(f"not saving S3 object {obj['Key']!r}: its key leaves the folder")
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(bucket["Name"], obj["Key"], str(path))
                count += 1
        root.mkdir(parents=True, exist_ok=True)  # an empty bucket is kept too
    staging.mkdir(parents=True, exist_ok=True)  # no bucket at all: an empty copy
    shutil.rmtree(dest, ignore_errors=True)
    staging.rename(dest)
    return count


def restore_objects(endpoint: str, src: Path) -> int:
    """Put back what `save_objects` saved: each folder of `src` a bucket, each file an object."""
    if not src.is_dir():
        return 0
    client = _s3(endpoint)
    count = 0
    for folder in sorted(p for p in src.iterdir() if p.is_dir()):
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=folder.name)
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()):
            client.upload_file(str(path), folder.name, path.relative_to(folder).as_posix())
            count += 1
    return count


def _start(name: str, cmd: list[str], env: dict, state: Path) -> subprocess.Popen:
    log = open(state / f"{name}.log", "a")  # noqa: SIM115 (the server keeps it)
    return subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=state
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stack_env(ports: dict[str, int]) -> dict[str, str]:
    """The variables that point the pipeline (MLflow, Prefect, boto3, DVC) at the stack."""
    s3 = f"http://127.0.0.1:{ports['s3']}"
    return {
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{ports['mlflow']}",
        "PREFECT_API_URL": f"http://127.0.0.1:{ports['prefect']}/api",
        "AWS_ENDPOINT_URL": s3,
        **CREDENTIALS,
        # `vae-pipeline retrain` flags for `make run`: version the data in the stack's S3
        "VAE_PIPELINE_STACK_ARGS": f"--set data.remote=s3 --set data.s3_url=s3://{BUCKET}/dvc",
    }


def up(state: Path, ports: dict[str, int]) -> dict[str, str]:
    state.mkdir(parents=True, exist_ok=True)
    pids_file = state / "pids.json"
    if pids_file.is_file():
        running = json.loads(pids_file.read_text())
        if all(_alive(pid) for pid in running["pids"].values()):
            print(f"the stack is already up (pids {running['pids']}); env in {state / 'env'}")
            return running["env"]
        down(state)
    env = stack_env(ports)
    base = {**os.environ, **QUIET, **CREDENTIALS}
    base.pop("PREFECT_API_URL", None)
    base.pop("MLFLOW_TRACKING_URI", None)
    pids: dict[str, int] = {}
    try:
        s3 = _start(
            "s3", [_bin("moto_server"), "-H", "127.0.0.1", "-p", str(ports["s3"])], base, state
        )
        pids["s3"] = s3.pid
        _wait(env["AWS_ENDPOINT_URL"] + "/", s3)
        restored = restore_objects(env["AWS_ENDPOINT_URL"], state / "s3")
        client = _s3(env["AWS_ENDPOINT_URL"])
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=BUCKET)
        mlflow = _start(
            "mlflow",
            [
                _bin("mlflow"),
                "server",
                "--backend-store-uri",
                f"sqlite:///{(state / 'mlflow.db').resolve()}",
                "--artifacts-destination",
                f"s3://{BUCKET}/mlflow",
                "--host",
                "127.0.0.1",
                "--port",
                str(ports["mlflow"]),
                "--workers",
                "2",
            ],  # fmt: skip
            {**base, "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]},
            state,
        )
        pids["mlflow"] = mlflow.pid
        prefect = _start(
            "prefect",
            [_bin("prefect"), "server", "start", "--host", "127.0.0.1", "--port",
             str(ports["prefect"])],
            {**base, "PREFECT_HOME": str((state / "prefect").resolve())},
            state,
        )  # fmt: skip
        pids["prefect"] = prefect.pid
        _wait(env["MLFLOW_TRACKING_URI"] + "/health", mlflow)
        _wait(env["PREFECT_API_URL"] + "/health", prefect)
    except BaseException:
        _stop(pids)
        raise
    (state / "env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    pids_file.write_text(json.dumps({"pids": pids, "env": env}, indent=2))
    print(f"stack up: MLflow {env['MLFLOW_TRACKING_URI']}, Prefect {env['PREFECT_API_URL']}, ")
    print(f"S3 {env['AWS_ENDPOINT_URL']} (bucket {BUCKET}); environment in {state / 'env'}")
    if restored:
        print(f"restored {restored} S3 objects saved at the last `down` ({state / 's3'})")
    return env


def _stop(pids: dict[str, int]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, sig)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in pids.values()):
            time.sleep(0.2)
            for pid in pids.values():  # reap our own children
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if not any(_alive(p) for p in pids.values()):
            return


def down(state: Path) -> None:
    pids_file = state / "pids.json"
    if not pids_file.is_file():
        print("the stack is not up")
        return
    info = json.loads(pids_file.read_text())
    pids = info["pids"]
    saved = None
    if "s3" in pids and _alive(pids["s3"]):
        try:
            saved = save_objects(info["env"]["AWS_ENDPOINT_URL"], state / "s3")
        except Exception as exc:  # stopping must not depend on it; say what was not kept
            print(f"could not save the S3 objects ({exc}); the copy of the last `down` is kept")
    _stop(pids)
    pids_file.unlink()
    (state / "env").unlink(missing_ok=True)
    kept = "" if saved is None else f" and {saved} S3 objects (restored at the next `up`)"
    print(
        f"stack down (stopped {', '.join(pids)}); MLflow and Prefect databases{kept} kept in {state}"
    )


def status(state: Path) -> int:
    pids_file = state / "pids.json"
    if not pids_file.is_file():
        print("the stack is not up")
        return 1
    info = json.loads(pids_file.read_text())
    for name, pid in info["pids"].items():
        print(f"{name:<8} pid {pid:<8} {'running' if _alive(pid) else 'NOT RUNNING'}")
    return 0 if all(_alive(p) for p in info["pids"].values()) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("up", "down", "status"))
    parser.add_argument("--dir", type=Path, default=Path(".stack"), help="state folder")
    for name, port in DEFAULT_PORTS.items():
        parser.add_argument(f"--{name}-port", type=int, default=port, help=f"default {port}")
    args = parser.parse_args()
    if args.action == "up":
        up(args.dir, {n: getattr(args, f"{n}_port") for n in DEFAULT_PORTS})
        return 0
    if args.action == "down":
        down(args.dir)
        return 0
    return status(args.dir)


if __name__ == "__main__":
    sys.exit(main())
