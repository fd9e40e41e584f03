"""Data at scale: ingest, version, push, append, re-ingest, pull and prepare N images.

    python bench/data_scale.py                               # 10,000 images, shards
    python bench/data_scale.py --images 10000 100000         # the growth with N
    python bench/data_scale.py --images 10000 --layout files # one file per image, as before

For each N, on a synthetic folder of N 64x64 RGB PNGs in 10 label folders (smooth random
content, about 4 KB a file; generated once per N and kept in --cache), with a DVC remote on S3
(moto's server on 127.0.0.1, spoken to by DVC over HTTP), each step runs as its own process
and is timed with its peak RSS (os.wait4):

1. ingest: the snapshot (list, read, decode check, write shards), `dvc add`, `dvc push`;
2. re-ingest of the unchanged folder (all three again);
3. a 1 % append (N/100 new images): the same, and the bytes the push added to the bucket;
4. `dvc pull` of that version in a second workspace (its .dvc/config and the pointer file);
5. prepare (64x64 RGB splits by default, memory-mapped) in the second workspace, from the
   pulled data.

Disk: about 8 copies of the PNGs' bytes at once (source, snapshot, DVC cache, the S3 server,
the second workspace and its cache, the prepared arrays): 10^6 images need about 50 GB.

Prints one markdown table (date, machine, N, step, seconds, images/s, peak RSS) for
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUCKET = "bench-data"
QUIET = {
    "DVC_NO_ANALYTICS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "DO_NOT_TRACK": "true",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def _make_one(args: tuple[str, int]) -> None:
    root, i = args
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((64, 64), Image.Resampling.BILINEAR)
    img.save(Path(root) / f"class{i % 10}" / f"{i:07d}.png")


def make_folder(root: Path, first: int, count: int) -> None:
    for k in range(10):
        (root / f"class{k}").mkdir(parents=True, exist_ok=True)
    with multiprocessing.get_context("forkserver").Pool() as pool:
        pool.map(_make_one, [(str(root), i) for i in range(first, first + count)], chunksize=500)


def _params(ws: Path, source: Path, layout: str, size: int, channels: int) -> None:
    import yaml

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update(
        source=str(source),
        layout=layout,
        remote="s3",
        s3_url=f"s3://{BUCKET}/dvc",
        image_size=size,
        channels=channels,
    )
    (ws / "params.yaml").write_text(yaml.safe_dump(params))


def run_step(step: str, ws: Path) -> dict:
    """One step in this process (the child): its sub-timings."""
    from vae_pipeline import versioning
    from vae_pipeline.config import load_config
    from vae_pipeline.data.preparation import prepare
    from vae_pipeline.data.sources import snapshot_source

    cfg = load_config(ws / "params.yaml")
    times: dict[str, float] = {}
    start = time.perf_counter()
    if step == "ingest":
        report = snapshot_source(cfg, ws)
        times["snapshot"] = time.perf_counter() - start
        t = time.perf_counter()
        versioning.ensure_repo(ws)
        versioning.dvc(["add", "-q", cfg.data.raw_dir], ws)
        times["dvc add"] = time.perf_counter() - t
        t = time.perf_counter()
        remote = versioning.configure_s3_remote(cfg, ws)
        versioning.dvc(["push", "-q", "-r", remote, f"{cfg.data.raw_dir}.dvc"], ws)
        times["dvc push"] = time.perf_counter() - t
        times["fetched"] = report.fetched
    elif step == "pull":
        versioning.dvc(["pull", "-q", "-r", "s3", f"{cfg.data.raw_dir}.dvc"], ws)
    elif step == "prepare":
        prepare(cfg, ws)
    times["total"] = time.perf_counter() - start
    return times


def timed(step: str, ws: Path, env: dict) -> tuple[dict, float]:
    """Run `step` in a child process: (its timings, its peak RSS in GB)."""
    cmd = [sys.executable, __file__, "--run-step", step, "--workspace", str(ws)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"step {step} failed in {ws}")
    return json.loads(out.strip().splitlines()[-1]), usage.ru_maxrss / 2**20


def bucket_bytes(client) -> int:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
    return sum(obj["Size"] for page in pages for obj in page.get("Contents", []))


def bench(n: int, args: argparse.Namespace, env: dict, client) -> list[tuple]:
    layout, cache = args.layout, args.cache
    source = cache / f"png-{n}"
    if not (source / "done").exists():
        shutil.rmtree(source, ignore_errors=True)
        t = time.perf_counter()
        make_folder(source, 0, n)
        (source / "done").write_text("")
        print(f"# made {n} PNGs in {time.perf_counter() - t:.0f} s", file=sys.stderr)
    (source / "done").unlink()  # not an image: the ingest would list it as ignored
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    rows = []
    try:
        src = work / "src"
        shutil.copytree(source, src, copy_function=os.link)  # links: the append adds files
        ws, clone = work / "ws", work / "clone"
        for w in (ws, clone):
            w.mkdir()
            _params(w, src, layout, args.prepare_size, args.prepare_channels)
        client.create_bucket(Bucket=BUCKET)

        def ingest(label: str, count: int) -> None:
            before = bucket_bytes(client)
            times, rss = timed("ingest", ws, env)
            pushed = bucket_bytes(client) - before
            for part in ("snapshot", "dvc add", "dvc push"):
                rows.append((n, f"{label}: {part}", times[part], count, None, None))
            rows.append((n, f"{label}, whole", times["total"], count, rss, pushed))

        ingest("ingest", n)
        ingest("re-ingest unchanged", n)
        make_folder(src, 10**8, n // 100)  # 1 % new images (numbered far from the others)
        ingest("1 % append", n + n // 100)
        shutil.copytree(ws / ".dvc", clone / ".dvc", ignore=shutil.ignore_patterns("cache", "tmp"))
        shutil.copy(ws / "data/raw.dvc", clone / "raw.dvc.tmp")
        (clone / "data").mkdir()
        (clone / "raw.dvc.tmp").rename(clone / "data/raw.dvc")
        times, rss = timed("pull", clone, env)
        rows.append((n, "dvc pull (second workspace)", times["total"], n + n // 100, rss, None))
        times, rss = timed("prepare", clone, env)
        shape = f"{args.prepare_size}x{args.prepare_size}x{args.prepare_channels}"
        rows.append((n, f"prepare ({shape})", times["total"], n + n // 100, rss, None))
    finally:
        (source / "done").write_text("")
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for obj in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=obj["Key"])
        client.delete_bucket(Bucket=BUCKET)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, nargs="+", default=[10_000])
    parser.add_argument("--layout", choices=["shards", "files"], default="shards")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "vae-data-scale"
    )
    parser.add_argument("--prepare-size", type=int, default=64, help="prepared side (pixels)")
    parser.add_argument("--prepare-channels", type=int, choices=[1, 3], default=3)
    parser.add_argument("--run-step", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_step:
        print(json.dumps(run_step(args.run_step, args.workspace)))
        return
    from tests.s3_helpers import MotoServer

    args.cache.mkdir(parents=True, exist_ok=True)
    server = MotoServer()
    try:
        env = dict(os.environ, **QUIET, **server.env())
        client = server.client()
        rows = [row for n in args.images for row in bench(n, args, env, client)]
    finally:
        server.stop()
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    flags = f"--images {' '.join(map(str, args.images))} --layout {args.layout}"
    if (args.prepare_size, args.prepare_channels) != (64, 3):
        flags += f" --prepare-size {args.prepare_size} --prepare-channels {args.prepare_channels}"
    print(f"\n{date.today()}, {machine}: `python bench/data_scale.py {flags}`\n")
    print("| images | step | seconds | images/s | peak RSS | bytes pushed |")
    print("|---|---|---|---|---|---|")
    for n, step, seconds, count, rss, pushed in rows:
        rate = f"{count / seconds:,.0f}" if seconds > 0 else ""
        print(
            f"| {n:,} | {step} | {seconds:.1f} | {rate} | "
            f"{f'{rss:.2f} GB' if rss else ''} | {f'{pushed / 2**20:,.1f} MiB' if pushed is not None else ''} |"
        )


if __name__ == "__main__":
    main()
