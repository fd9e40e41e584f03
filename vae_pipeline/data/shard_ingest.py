"""Snapshot a folder, archive or S3 source into shards (`data.layout: shards`, the default).

One pass over the source's listing decides, per image, from the previous snapshot:
- **unchanged** (same path, size and modification time as the listing beside the raw area
  recorded, and that listing's hash is the manifest's): kept where it is, nothing read;
- **new or changed**: read once, decoded in full in worker processes, hashed, and written to
  new shards in path order (a changed file whose bytes turn out the same is kept where it is).
The previous snapshot's shards are then carried over: hard-linked when every image in them is
kept, rewritten without the images that are gone (only the shards a removal touches), dropped
when empty. An append therefore writes new shards and leaves the old ones byte-identical, so
`dvc add` hashes and `dvc push` uploads only the new ones.

A fresh ingest writes the images in path order from key 0, so the same content gives the same
shards and the same data version whatever order the source lists its files in. An append
places its images after the existing ones: the version then records that history too.

The listing (`<raw_dir>.listing.csv`: path, size, mtime, sha256) sits beside the raw area,
like the ingest report, not in the data version; without it (a second clone) every file is read
and hashed once, and those whose bytes are in the manifest are still kept where they are.
"""

from __future__ import annotations

import csv
import gc
import logging
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data.entries import Entry
from vae_pipeline.data.errors import DataError, NoImages
from vae_pipeline.data.images import IMAGE_EXTENSIONS, ingest_worker, pixel_check
from vae_pipeline.data.intake import (
    IngestReport,
    bad_image_policy,
    link_or_copy,
    listing_path,
    previous_limit,
    source_entries,
)
from vae_pipeline.data.pools import map_bounded, worker_count
from vae_pipeline.data.shards import (
    MANIFEST_DIR,
    SHARDS_DIR,
    Record,
    ShardWriter,
    key_of,
    label_of,
    read_manifest,
    rewrite_without,
    shard_index,
    shard_members,
    shard_names,
)

log = logging.getLogger(__name__)

LISTING_FIELDS = ("path", "size", "mtime", "sha256")


def read_listing(raw: Path) -> dict[str, tuple[int, int, str]]:
    try:
        with open(listing_path(raw), newline="") as fh:
            rows = csv.reader(fh)
            if tuple(next(rows, ())) != LISTING_FIELDS:
                return {}
            return {path: (int(size), int(mtime), sha) for path, size, mtime, sha in rows}
    except (OSError, ValueError):  # no listing, or not one written here: every file is read
        return {}


def write_listing(path: Path, rows: dict[str, tuple[int, int, str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LISTING_FIELDS)
        for rel in sorted(rows):
            writer.writerow([rel, *rows[rel]])


class _Pending(NamedTuple):
    """A new or changed image: where to read it (the folder's file or a spooled copy)."""

    rel: str
    path: str
    size: int
    mtime: int


def _list_source(
    entries: Iterator[Entry],
    kind: str,
    source: str,
    spool: Path,
    old: dict[str, Record],
    listing: dict[str, tuple[int, int, str]],
) -> tuple[dict[str, Record], list[_Pending], dict[str, tuple[int, int, str]]]:
    """Split the source's entries (the first of a repeated path) into the unchanged (their
    old records), and the pending ones to read; archive members and S3 objects of the pending
    are copied to `spool` (a folder's files are read in place)."""
    kept: dict[str, Record] = {}
    pending: list[_Pending] = []
    rows: dict[str, tuple[int, int, str]] = {}
    downloads = []
    seen: set[str] = set()  # an archive or bucket may list a path twice; a folder cannot
    dedupe = kind != "folder"
    try:
        for entry in tqdm(entries, desc="list", unit="file", mininterval=2.0, disable=None):
            if dedupe:
                if entry.rel in seen:
                    continue
                seen.add(entry.rel)
            mtime = int(entry.mtime)
            prior = old.get(entry.rel)
            if prior is not None:
                known = listing.get(entry.rel)
                if known == (entry.size, mtime, prior.sha256):
                    kept[entry.rel] = prior
                    rows[entry.rel] = known
                    continue
            if entry.path is not None:
                pending.append(_Pending(entry.rel, entry.path, entry.size, mtime))
                continue
            dest = spool / str(len(pending))
            item = _Pending(entry.rel, str(dest), entry.size, mtime)
            if kind == "s3":
                downloads.append((entry, dest))  # fetched below, several at a time
            else:
                entry.fetch(dest)
            pending.append(item)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        raise DataError(f"archive {source} cannot be read ({exc}): is it complete?") from exc
    if downloads:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda item: item[0].fetch(item[1]), downloads))
    pending.sort(key=lambda p: p.rel.split("/"))
    return kept, pending, rows


def _previous_shards(old_raw: Path) -> dict[str, list[Record]]:
    """The previous snapshot's manifests, per shard: only shards whose tar is there (a missing
    one's images are read from the source again); none when a manifest cannot be read (then
    the ingest starts afresh: the versions already recorded stay in DVC's cache and remote)."""
    try:
        return {
            shard: read_manifest(old_raw, shard)
            for shard in shard_names(old_raw)
            if (old_raw / SHARDS_DIR / f"{shard}.tar").is_file()
        }
    except (OSError, ValueError, csv.Error) as exc:
        log.warning(
            "previous snapshot in %s unreadable (%s): every image is read again", old_raw, exc
        )
        return {}


def _carry_over(
    old_raw: Path, staging: Path, old_shards: dict[str, list[Record]], kept: dict[str, Record]
) -> None:
    """The previous snapshot's shards in `staging`: linked when whole, rewritten without the
    images that are gone, left out when none is kept."""
    for shard, records in old_shards.items():
        keep = [r for r in records if kept.get(r.path) == r]
        if len(keep) == len(records):
            for folder, suffix in ((SHARDS_DIR, ".tar"), (MANIFEST_DIR, ".csv")):
                src, dest = old_raw / folder / f"{shard}{suffix}", staging / folder / shard
                link_or_copy(src, dest.with_suffix(suffix))
        elif keep:
            rewrite_without(old_raw, staging, shard, keep)
            log.info("rewrote %s without %d removed image(s)", shard, len(records) - len(keep))


def _recheck_sizes(
    old_raw: Path, old_shards: dict[str, list[Record]], kept: dict[str, Record], limit: int
) -> list[dict]:
    """The kept images over `limit` (data.max_image_pixels, lowered since the last ingest),
    taken out of `kept`, as bad images with the reason."""
    bad = []
    for shard, listed in old_shards.items():
        records = {r.member: r for r in listed if kept.get(r.path) == r}
        if not records:
            continue
        for name, data in shard_members(old_raw, shard):
            record = records.get(name)
            problem = record and pixel_check(data, limit, record.path)
            if problem:
                bad.append(
                    {"path": record.path, "reason": problem.removeprefix(f"{record.path}: ")}
                )
                del kept[record.path]
    return bad


def fill_shards(cfg: Config, kind: str, source: str, staging: Path, old_raw: Path) -> IngestReport:
    """Make `staging` the sharded snapshot of a folder, archive or S3 source, carrying over
    what the previous snapshot `old_raw` already holds."""
    # millions of small tuples and strings, none of them in a reference cycle: Python's cycle
    # collector would walk them all again and again (10 % of an unchanged re-ingest at 10^6)
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _fill_shards(cfg, kind, source, staging, old_raw)
    finally:
        if enabled:
            gc.enable()


def _fill_shards(cfg: Config, kind: str, source: str, staging: Path, old_raw: Path) -> IngestReport:
    report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
    report.max_image_pixels = cfg.data.max_image_pixels
    unsafe: list[dict] = []
    entries = source_entries(kind, source, report, unsafe)
    old_shards = _previous_shards(old_raw)
    old = {r.path: r for records in old_shards.values() for r in records}
    listing = read_listing(old_raw)
    spool = staging / ".spool"
    spool.mkdir(parents=True)
    kept, pending, rows = _list_source(entries, kind, source, spool, old, listing)
    if not kept and not pending:
        what = "archive" if kind == "archive" else "data source"
        raise NoImages(
            f"{what} {source} holds no images (looked for "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
            + (f"; {len(unsafe)} unsafe entries were refused" if unsafe else "")
        )
    for folder in (SHARDS_DIR, MANIFEST_DIR):
        (staging / folder).mkdir()
    # new images are numbered after every key, and shard, the previous snapshot used
    next_key = max((int(r.key) + 1 for r in old.values()), default=0)
    next_shard = max((shard_index(s) + 1 for s in old_shards), default=0)
    bad: list[dict] = []
    new: list[str] = []
    writer: ShardWriter | None = None
    results = map_bounded(
        ingest_worker,
        ((p.path, cfg.data.max_image_pixels) for p in pending),
        len(pending),
        worker_count(cfg),
        "check",
    )
    for item, (data, digest, problem) in zip(pending, results, strict=True):
        if problem is not None:
            reason = problem.removeprefix(f"{item.path}: ").replace(item.path, item.rel)
            bad.append({"path": item.rel, "reason": reason})
            continue
        rows[item.rel] = (item.size, item.mtime, digest)
        prior = old.get(item.rel)
        if prior is not None and prior.sha256 == digest:
            kept[item.rel] = prior  # touched, not changed
            continue
        if cfg.data.on_bad_image == "fail" and (bad or unsafe):
            continue  # the ingest stops below: nothing more to write
        if writer is None:
            writer = ShardWriter(staging, next_shard, cfg.data.shard_bytes)
        record = Record(key_of(next_key), item.rel, digest, label_of(item.rel), len(data))
        next_key += 1
        writer.add(record, data)
        new.append(item.rel)
    if cfg.data.max_image_pixels < previous_limit(old_raw):
        # kept images passed a looser size rule: their headers are read again from the shards
        bad += _recheck_sizes(old_raw, old_shards, kept, cfg.data.max_image_pixels)
    report.skipped = bad_image_policy(cfg, source, unsafe, bad)
    if writer is not None:
        writer.close()
    shutil.rmtree(spool)
    if old:
        _carry_over(old_raw, staging, old_shards, kept)
    report.reused, report.fetched = len(kept), len(new)
    report.images = report.reused + report.fetched
    if report.images == 0:
        raise NoImages(
            f"data source {source} holds no usable images ({len(report.skipped)} unusable): see "
            "the reasons above"
        )
    final = kept.keys() | new
    report.removed = sum(1 for rel in old if rel not in final)
    # rows has every image read or kept; those left out since (over a lowered size limit) go
    final_rows = rows if len(rows) == len(final) else {rel: rows[rel] for rel in final}
    if final_rows == listing:  # unchanged: the same file (a million rows take seconds to write)
        shutil.copy2(listing_path(old_raw), listing_path(staging))
    else:
        write_listing(listing_path(staging), final_rows)
    return report
