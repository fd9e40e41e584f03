"""Turn the raw snapshot into uint8 arrays per split, plus a manifest and a per-image index.

Output in `data.prepared_dir`:
  {train,val,test}_images.npy   uint8 (N, C, H, W), read memory-mapped
  {train,val,test}_labels.npy   int64 (N,), -1 where the source has no label
  index.csv                     split, row, source, sha256, label: one line per image
  manifest.json                 data version, sizes, counts, label names, skipped bad images

Splits are a deterministic function of each image's content hash, so an image never moves
between splits when the dataset grows. Fashion-MNIST keeps its official test set (the one
published numbers use); its validation images come out of the training set by hash.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.images import BadImage, decode_image, list_images

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_fraction(digest: str) -> float:
    """Map a hex digest to a uniform number in [0, 1)."""
    return int(digest[:16], 16) / float(1 << 64)


def assign_split(digest: str, val_fraction: float, test_fraction: float) -> str:
    u = hash_fraction(digest)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def _fit_fashion_mnist(images: torch.Tensor, size: int, channels: int) -> np.ndarray:
    """(N, 28, 28) uint8 -> (N, C, size, size): zero-pad (the background is black) or resize."""
    x = images.unsqueeze(1)
    if size >= x.shape[-1]:
        pad = size - x.shape[-1]
        x = torch.nn.functional.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    else:
        x = torch.nn.functional.interpolate(
            x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = x.round().clamp(0, 255).to(torch.uint8)
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return np.ascontiguousarray(x.numpy())


def _load_fashion_mnist(cfg: Config, raw: Path) -> tuple[dict, list[str], list[str]]:
    from torchvision.datasets import FashionMNIST

    rows: dict[str, list] = {s: [] for s in SPLITS}
    label_names: list[str] = []
    for train in (True, False):
        try:
            ds = FashionMNIST(root=str(raw), train=train, download=False)
        except RuntimeError as exc:
            raise DataError(
                f"raw snapshot {raw} has no Fashion-MNIST IDX files ({exc}): run "
                "`vae-pipeline ingest` first"
            ) from exc
        label_names = list(ds.classes)
        images = _fit_fashion_mnist(ds.data, cfg.data.image_size, cfg.data.channels)
        part = "train" if train else "t10k"
        for i, (img, label) in enumerate(zip(images, ds.targets.tolist(), strict=True)):
            digest = content_hash(ds.data[i].numpy().tobytes())
            split = assign_split(digest, cfg.data.val_fraction, 0.0) if train else "test"
            rows[split].append((img, label, f"{part}[{i}]", digest))
    return rows, label_names, []


def _load_folder(cfg: Config, raw: Path) -> tuple[dict, list[str], list[str]]:
    root = raw / "images"
    files = list_images(root) if root.is_dir() else []
    if not files:
        raise DataError(f"raw snapshot {root} holds no images: run `vae-pipeline ingest` first")
    label_names = sorted(
        {p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1}
    )
    label_of = {name: i for i, name in enumerate(label_names)}
    rows: dict[str, list] = {s: [] for s in SPLITS}
    bad: list[str] = []
    for path in tqdm(files, desc="decode", unit="img", mininterval=2.0, disable=len(files) < 1000):
        rel = path.relative_to(root)
        try:
            img = decode_image(path, cfg.data.image_size, cfg.data.channels)
        except BadImage as exc:
            if cfg.data.on_bad_image == "fail":
                raise DataError(
                    f"{exc}; nothing was written (set data.on_bad_image=skip to skip bad images)"
                ) from None
            log.warning("skipping bad image %s", exc)
            bad.append(str(rel))
            continue
        digest = content_hash(path.read_bytes())
        label = label_of[rel.parts[0]] if len(rel.parts) > 1 else -1
        split = assign_split(digest, cfg.data.val_fraction, cfg.data.test_fraction)
        rows[split].append((img, label, str(rel), digest))
    return rows, label_names, bad


def prepare(cfg: Config, workdir: Path = Path("."), data_version: str = "unversioned") -> dict:
    """Build the prepared splits from the raw snapshot; returns the manifest."""
    raw = (workdir / cfg.data.raw_dir).resolve()
    if not raw.is_dir():
        raise DataError(f"raw data folder {raw} does not exist: run `vae-pipeline ingest` first")
    if cfg.data.source == "fashion-mnist":
        rows, label_names, bad = _load_fashion_mnist(cfg, raw)
    else:
        rows, label_names, bad = _load_folder(cfg, raw)
    if cfg.data.limit is not None:
        rows = {s: r[: cfg.data.limit] for s, r in rows.items()}
    for split in ("train", "test"):
        if not rows[split]:
            raise DataError(
                f"split {split!r} is empty after preparing {raw}: add images or raise "
                "data.test_fraction / data.limit"
            )

    out = (workdir / cfg.data.prepared_dir).resolve()
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    with open(staging / "index.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "row", "source", "sha256", "label"])
        for split in SPLITS:
            items = rows[split]
            images = np.stack([r[0] for r in items]) if items else np.zeros((0, *shape), np.uint8)
            labels = np.asarray([r[1] for r in items], dtype=np.int64)
            np.save(staging / f"{split}_images.npy", images)
            np.save(staging / f"{split}_labels.npy", labels)
            for i, (_, label, source, digest) in enumerate(items):
                writer.writerow([split, i, source, digest, label])
    manifest = {
        "data_version": data_version,
        "source": cfg.data.source,
        "image_size": cfg.data.image_size,
        "channels": cfg.data.channels,
        "counts": {s: len(rows[s]) for s in SPLITS},
        "label_names": label_names,
        "bad_images": bad,
    }
    (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info("prepared %s in %s (%d bad images skipped)", manifest["counts"], out, len(bad))
    return manifest
