"""Data throughput: ingest and prepare images/s, and the loader against training.

    python bench/data_throughput.py                           # 2,000 PNGs of 96x96 RGB
    python bench/data_throughput.py --images 5000 --format jpg --source-size 250

One run, on a synthetic folder of real image files (random content, so PNGs do not compress to
nothing), into the demo's prepared shape (1x32x32 unless --image-size/--channels say otherwise):
1. ingest (snapshot: copy + full decode check) with 1 worker process and with all cores;
   then a second ingest of the unchanged folder (the incremental path: links, no decode);
2. prepare (hash, decode, resize, write memory-mapped .npy) with 1 worker and with all cores;
3. the training loader (the trainer's DataLoader over the memory-mapped split: batch 128,
   shuffled, num_workers 0, uint8 -> float on the device) against training steps of the demo
   ConvVAE on the same batch size, measured in the same run. The ratio loader / training says
   how far loading is from being the bottleneck (it must stay well above 1).
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler

from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.elbo import elbo_terms
from vae_pipeline.model import ConvVAE


def make_folder(root: Path, n: int, size: int, fmt: str) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        label = root / f"class{i % 10}"
        label.mkdir(parents=True, exist_ok=True)
        # smooth random images (upsampled noise): realistic file sizes for PNG and JPEG
        small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.BILINEAR)
        img.save(label / f"{i:06d}.{fmt}", **({"quality": 90} if fmt == "jpg" else {}))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def cfg_for(src: Path, workers: int, args) -> object:
    return build_config(
        {
            "data": {
                "source": str(src),
                "image_size": args.image_size,
                "channels": args.channels,
                "decode_workers": workers,
                "val_fraction": 0.1,
                "test_fraction": 0.1,
            },
            "model": {"latent_dim": 32},
        }
    )


def loader_rate(prepared: Path, batch: int, epochs: int = 3) -> float:
    split = PreparedSplit(prepared, "train")
    loader = DataLoader(
        split,
        batch_size=batch,
        sampler=RandomSampler(split, generator=torch.Generator().manual_seed(0)),
        drop_last=True,
    )
    best = 0.0
    for _ in range(epochs):
        n, start = 0, time.perf_counter()
        for x, _ in loader:
            x = to_unit_float(x)
            n += len(x)
        best = max(best, n / (time.perf_counter() - start))
    return best


def training_rate(channels: int, size: int, batch: int, steps: int = 12) -> float:
    torch.manual_seed(0)
    model = ConvVAE(in_channels=channels, image_size=size, latent_dim=32)
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x = torch.rand(batch, channels, size, size)

    def step():
        opt.zero_grad(set_to_none=True)
        (-elbo_terms(model, x)["elbo"]).mean().backward()
        opt.step()

    for _ in range(2):
        step()
    return batch * steps / timed(lambda: [step() for _ in range(steps)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--source-size", type=int, default=96, help="side of the source images")
    p.add_argument("--format", choices=("png", "jpg"), default="png")
    p.add_argument("--image-size", type=int, default=32, help="prepared side (data.image_size)")
    p.add_argument("--channels", type=int, choices=(1, 3), default=1)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    cores = len(os.sched_getaffinity(0))
    tmp = Path(tempfile.mkdtemp(prefix="data-bench-"))
    try:
        src = tmp / "src"
        make_folder(src, args.images, args.source_size, args.format)
        mb = sum(f.stat().st_size for f in src.rglob("*") if f.is_file()) / 1e6
        rows = []
        for workers in (1, cores):
            ws = tmp / f"ws{workers}"
            cfg = cfg_for(src, workers, args)
            t_ingest = timed(lambda cfg=cfg, ws=ws: snapshot_source(cfg, ws))
            t_again = timed(lambda cfg=cfg, ws=ws: snapshot_source(cfg, ws))
            t_prep = timed(lambda cfg=cfg, ws=ws: prepare(cfg, ws))
            rows.append((workers, t_ingest, t_again, t_prep))
        prepared = tmp / f"ws{cores}" / "data/prepared"
        load = loader_rate(prepared, args.batch)
        train = training_rate(args.channels, args.image_size, args.batch)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n = args.images
    print(
        f"Date {date.today()}. Machine: {cores}-core {platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads."
    )
    print(
        f"Source: {n:,} {args.format.upper()} files of {args.source_size}x{args.source_size} RGB "
        f"({mb:.1f} MB); prepared to {args.channels}x{args.image_size}x{args.image_size}.\n"
    )
    print("| step | 1 worker, images/s | " + f"{cores} workers, images/s |")
    print("|---|---|---|")
    (_, i1, a1, p1), (_, i2, a2, p2) = rows[0], rows[-1]
    print(f"| ingest (copy + full decode check) | {n / i1:,.0f} | {n / i2:,.0f} |")
    print(f"| ingest again, unchanged (links only) | {n / a1:,.0f} | {n / a2:,.0f} |")
    print(f"| prepare (hash, decode, resize, write) | {n / p1:,.0f} | {n / p2:,.0f} |")
    print(
        f"\nLoader (trainer's DataLoader, batch {args.batch}, memory-mapped, 1 process): "
        f"{load:,.0f} images/s; training steps of the ConvVAE at that shape: {train:,.0f} "
        f"images/s; loader / training = {load / train:.1f}x."
    )


if __name__ == "__main__":
    main()
