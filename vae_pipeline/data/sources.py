"""Snapshot a data source into the raw area (`data.raw_dir`), which DVC then versions.

Sources (`data.source`):
- `fashion-mnist`: the IDX files, as `FashionMNIST/raw/<IDX files>` (torchvision reads them there).
- `idx:<folder>`: any dataset in the four-file MNIST layout (MNIST, KMNIST, EMNIST, Fashion-MNIST),
  as `IDX/{train,t10k}-{images,labels}-...-ubyte` (decompressed), plus `IDX/classes.txt` (one
  label name per line) when the folder has one. The label files are optional.
- a folder of images, a `.zip` / `.tar` / `.tar.gz` / `.tgz` archive, or an S3 prefix
  `s3://bucket/prefix` (sub-folders are labels; an archive's single top-level folder is
  dropped), by `data.layout`:
  - `shards` (default): WebDataset tar shards and a manifest per shard (`shard_ingest`,
    `shards`); an append writes new shards, unchanged images are not read again;
  - `files`: the image files as `images/<relative path>` (here): files whose size and
    modification time match the previous snapshot are hard-linked from it rather than copied,
    extracted or downloaded again; only new and changed files are fetched and checked.

The snapshot is built beside the raw area and swapped in at the end, so a failure half-way leaves
the previous snapshot as it was.

The readers live beside this module: `fixed_sources` (Fashion-MNIST and `idx:`), `entries`
(folders, archives, S3), `intake` (what both layouts share); every name stays importable from
here.

Every fetched file is decoded in full (in worker processes) before it enters the snapshot.
Unusable ones (corrupt, empty, truncated, not an image, over `data.max_image_pixels`) and unsafe
archive entries (absolute paths, `..`, links, devices) are, per `data.on_bad_image`, left out and
listed in the ingest report, or stop the ingest before anything is written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data.entries import Entry
from vae_pipeline.data.errors import DataError, NoImages
from vae_pipeline.data.fixed_sources import (
    IDX_PREFIX,
    INSTALL_HINT,
    copy_fashion_mnist,
    copy_idx,
    download_fashion_mnist,
    fashion_mnist_count,
)
from vae_pipeline.data.images import (
    IMAGE_EXTENSIONS,
    check_worker,
    list_images,
    pixel_check,
)
from vae_pipeline.data.intake import (
    IngestReport,
    bad_image_policy,
    link_or_copy,  # noqa: F401 - importable from here, as before
    listing_dir,
    previous_limit,
    report_path,
    source_entries,
    source_kind,
)
from vae_pipeline.data.pools import (  # noqa: F401 - importable from here, as before
    POOL_THRESHOLD,
    map_bounded,
    worker_count,
)
from vae_pipeline.data.shard_ingest import fill_shards

log = logging.getLogger(__name__)


# --- the snapshot -------------------------------------------------------------------------------


def _same_file(path: Path, entry: Entry) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == entry.size and int(st.st_mtime) == int(entry.mtime)


def _fetch_entries(
    entries: Iterator[Entry], kind: str, source: str, images: Path, old: Path, report: IngestReport
) -> tuple[set[str], list[tuple[str, Path]], list[tuple[str, Path]]]:
    """Put each entry (the first of a repeated path) in `images`: linked from `old` when
    unchanged, else fetched (S3 objects several at a time). Returns the paths seen and the
    (path, file) pairs fetched and reused; counts the reused in `report`."""
    fetched: list[tuple[str, Path]] = []
    reused: list[tuple[str, Path]] = []
    downloads: list[tuple[Entry, Path]] = []
    seen: set[str] = set()
    try:
        for entry in tqdm(entries, desc="fetch", unit="file", mininterval=2.0, disable=None):
            if entry.rel in seen:
                continue
            seen.add(entry.rel)
            dest = images / entry.rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            prior = old / "images" / entry.rel
            if _same_file(prior, entry):
                link_or_copy(prior, dest)
                report.reused += 1
                reused.append((entry.rel, dest))
            elif kind == "s3":
                downloads.append((entry, dest))  # fetched below, several at a time
            else:
                entry.fetch(dest)
                os.utime(dest, (entry.mtime, entry.mtime))
                fetched.append((entry.rel, dest))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"archive {source} cannot be read ({exc}): is it complete?") from exc
    if downloads:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: item[0].fetch(item[1]), downloads))
        for entry, dest in downloads:
            os.utime(dest, (entry.mtime, entry.mtime))
            fetched.append((entry.rel, dest))
    return seen, fetched, reused


def _bad_images(
    cfg: Config, fetched: list[tuple[str, Path]], reused: list[tuple[str, Path]], old: Path
) -> list[dict]:
    """Every fetched file decoded in full (in worker processes), and the reused ones re-checked
    when data.max_image_pixels is stricter than the old snapshot's: the unusable, with why."""
    jobs = [(str(dest), cfg.data.max_image_pixels) for _, dest in fetched]
    checks = map_bounded(check_worker, jobs, len(jobs), worker_count(cfg), "check")
    limit = cfg.data.max_image_pixels
    problems = list(zip(fetched, checks, strict=True))
    if limit < previous_limit(old):  # carried-over files passed a looser rule: re-check sizes
        problems += [((rel, dest), pixel_check(dest, limit)) for rel, dest in reused]
    bad = [
        {"path": rel, "reason": problem.removeprefix(f"{dest}: ").replace(str(dest), rel)}
        for (rel, dest), problem in problems
        if problem is not None
    ]
    return sorted(bad, key=lambda item: item["path"].split("/"))  # whatever the listing order


def _leave_out(
    cfg: Config, source: str, images: Path, unsafe: list[dict], bad: list[dict]
) -> list[dict]:
    """data.on_bad_image: stop before anything is written (fail), or delete the bad files and
    log each file left out (skip). Returns the skipped (unsafe, then bad)."""
    skipped = bad_image_policy(cfg, source, unsafe, bad)
    for item in bad:
        (images / item["path"]).unlink()
    return skipped


def _removed_count(old: Path, images: Path) -> int:
    """The old snapshot's images that the new one no longer has (0 without an old one)."""
    old_images = old / "images"
    if not old_images.is_dir():
        return 0
    return sum(
        1 for p in list_images(old_images) if not (images / p.relative_to(old_images)).exists()
    )


def _fill_images(cfg: Config, kind: str, source: str, staging: Path, old: Path) -> IngestReport:
    """Fetch the source's images into staging/images, reusing unchanged files from `old`."""
    report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
    unsafe: list[dict] = []
    entries = source_entries(kind, source, report, unsafe)
    images = staging / "images"
    seen, fetched, reused = _fetch_entries(entries, kind, source, images, old, report)
    if not seen:
        what = "archive" if kind == "archive" else "data source"
        raise NoImages(
            f"{what} {source} holds no images (looked for "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
            + (f"; {len(unsafe)} unsafe entries were refused" if unsafe else "")
        )
    report.max_image_pixels = cfg.data.max_image_pixels
    bad = _bad_images(cfg, fetched, reused, old)
    skipped = _leave_out(cfg, source, images, unsafe, bad)
    report.skipped = skipped
    bad_reused = {item["path"] for item in bad} & {rel for rel, _ in reused}
    report.reused -= len(bad_reused)
    report.fetched = len(fetched) - (len(bad) - len(bad_reused))
    report.images = report.fetched + report.reused
    if report.images == 0:
        raise NoImages(
            f"data source {source} holds no usable images ({len(skipped)} unusable): see the "
            "reasons above"
        )
    report.removed = _removed_count(old, images)
    return report


def snapshot_source(cfg: Config, workdir: Path = Path(".")) -> IngestReport:
    """Make `data.raw_dir` a snapshot of `data.source` (replacing the previous one); the report
    (counts, skipped files and why) is also written to `ingest_report.json` beside it."""
    raw = (workdir / cfg.data.raw_dir).resolve()
    staging = raw.with_name(raw.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.rmtree(listing_dir(staging), ignore_errors=True)
    staging.mkdir(parents=True)
    kind = source_kind(cfg.data.source)
    source = cfg.data.source
    if kind in ("folder", "archive"):
        source = str((workdir / source).resolve())
        src = Path(source)
        if src == raw or raw.is_relative_to(src) or src.is_relative_to(raw):
            raise DataError(
                f"data.source {cfg.data.source} {'is inside' if src.is_relative_to(raw) else 'contains'} "
                f"the snapshot folder {cfg.data.raw_dir}: point it at the folder where new images "
                "land, outside data.raw_dir"
            )
    elif kind == "idx":
        source = IDX_PREFIX + str((workdir / source[len(IDX_PREFIX) :]).resolve())
    try:
        if kind == "fashion-mnist":
            report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
            if cfg.data.fashion_mnist_dir is None:
                download_fashion_mnist(staging)
            else:
                src_dir = Path(cfg.data.fashion_mnist_dir)
                if not src_dir.is_dir():
                    raise DataError(
                        f"Fashion-MNIST folder {src_dir} does not exist: {INSTALL_HINT}"
                    )
                copy_fashion_mnist(src_dir, staging)
            report.images = report.fetched = fashion_mnist_count(staging)
        elif kind == "idx":
            report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
            count = copy_idx(Path(source[len(IDX_PREFIX) :]), staging)
            report.images = report.fetched = count
        elif cfg.data.layout == "shards":
            report = fill_shards(cfg, kind, source, staging, raw)
        else:
            report = _fill_images(cfg, kind, source, staging, raw)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(listing_dir(staging), ignore_errors=True)
        raise
    old = raw.with_name(raw.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if raw.exists():
        raw.rename(old)
    staging.rename(raw)
    shutil.rmtree(old, ignore_errors=True)
    # the listing of a sharded snapshot (beside it, not in the data) goes with it
    shutil.rmtree(listing_dir(raw), ignore_errors=True)
    if listing_dir(staging).exists():
        listing_dir(staging).rename(listing_dir(raw))
    report.write(report_path(cfg, workdir))
    log.info(
        "snapshot of %s in %s: %d images (%d fetched, %d unchanged, %d removed, %d skipped)",
        cfg.data.source,
        raw,
        report.images,
        report.fetched,
        report.reused,
        report.removed,
        len(report.skipped),
    )
    return report
