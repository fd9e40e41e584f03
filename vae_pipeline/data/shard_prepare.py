"""Prepare from a sharded snapshot: the plan from the manifest alone (no image read), then
each shard streamed once by a worker process, which decodes its planned images straight into
their rows of the memory-mapped splits. The same rules as a per-file snapshot (path order,
duplicates by content hash, splits by content hash, labels from first-level folders), so the
same images give the same prepared data, bit for bit, whichever layout holds them."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data import pools
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.images import BadImage, decode_bytes
from vae_pipeline.data.shards import manifest, shard_members
from vae_pipeline.data.splits import SPLITS, plan_splits

log = logging.getLogger(__name__)


@dataclass
class ShardItem:
    rel: str
    digest: str
    label_dir: str | None
    shard: str
    member: str
    label: int = -1


def plan_shards(cfg: Config, raw: Path) -> tuple[dict[str, list[ShardItem]], list[str], list[dict]]:
    """`_plan_folder`'s plan from the manifest: path order, the first of equal bytes kept,
    labels in name order, each image's split by its hash."""
    records = sorted(manifest(raw), key=lambda r: r.path.split("/"))
    if not records:
        raise DataError(f"raw snapshot {raw} holds no images: run `vae-pipeline ingest` first")
    first: dict[str, ShardItem] = {}
    duplicates: list[dict] = []
    for r in records:
        if r.sha256 in first:
            duplicates.append({"path": r.path, "duplicate_of": first[r.sha256].rel})
            continue
        first[r.sha256] = ShardItem(r.path, r.sha256, r.label or None, r.shard, r.member)
    d = cfg.data
    plan, label_names = plan_splits(
        list(first.values()), duplicates, d.val_fraction, d.test_fraction
    )
    return plan, label_names, duplicates


def _decode_shard(task: tuple) -> list[tuple[str, int, str | None, tuple[int, int] | None]]:
    """Worker: stream one shard, decode its planned members into their rows (the split files
    opened memory-mapped here); (split, row, problem or None, own size) per planned member."""
    raw, shard, wanted, files, size, channels, max_pixels = task
    arrays = {split: np.load(path, mmap_mode="r+") for split, path in files.items()}
    out = []
    for name, data in shard_members(Path(raw), shard):
        for split, row, rel in wanted.get(name, ()):
            try:
                arrays[split][row], own = decode_bytes(data, rel, size, channels, max_pixels)
            except BadImage as exc:
                out.append((split, row, str(exc), None))
                continue
            out.append((split, row, None, own))
    for array in arrays.values():
        array.flush()
    missing = {(s, r) for rows in wanted.values() for s, r, _ in rows} - {
        (s, r) for s, r, *_ in out
    }
    out += [(s, r, f"{shard}: planned image missing from the shard", None) for s, r in missing]
    return out


def decode_shards(
    raw: Path, cfg: Config, plan: dict[str, list[ShardItem]], staging: Path, arrays: dict
) -> Iterator[tuple[str, int, str | None, tuple[int, int] | None]]:
    """`_decode_into`'s fill for the shards of `raw`: one task per shard, in worker processes
    from POOL_THRESHOLD images up."""
    by_shard: dict[str, dict[str, list[tuple[str, int, str]]]] = {}
    for split in SPLITS:
        for row, item in enumerate(plan[split]):
            by_shard.setdefault(item.shard, {}).setdefault(item.member, []).append(
                (split, row, item.rel)
            )
    for array in arrays.values():
        array.flush()
    files = {split: str(staging / f"{split}_images.npy") for split in arrays}
    raw_dir = str(raw)
    d = cfg.data
    total = sum(len(plan[s]) for s in SPLITS)
    workers = pools.worker_count(cfg)
    # fewer shards than 2 per worker: each is split into parts, every part a task that streams
    # the shard and decodes its own share of the members (reading is cheap next to decoding)
    parts = max(1, -(-2 * workers // len(by_shard))) if total >= pools.POOL_THRESHOLD else 1
    tasks = [
        (
            raw_dir,
            shard,
            dict(members[k::parts]),
            files,
            d.image_size,
            d.channels,
            d.max_image_pixels,
        )
        for shard, wanted in sorted(by_shard.items())
        for members in [sorted(wanted.items())]
        for k in range(parts)
    ]
    workers = min(workers, len(tasks))
    bar = tqdm(total=total, desc="decode", unit="img", mininterval=2.0, disable=total < 1000)
    with bar:
        if workers <= 1 or total < pools.POOL_THRESHOLD:
            results = map(_decode_shard, tasks)
            for result in results:
                bar.update(len(result))
                yield from result
            return
        ctx = multiprocessing.get_context("forkserver")
        with pools.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            for result in pool.map(_decode_shard, tasks):
                bar.update(len(result))
                yield from result
