"""Snapshot a folder, archive or S3 source into shards (`data.layout: shards`, the default).

One pass over the source's listing decides, per image, from the previous snapshot:
- **unchanged** (same path, size and modification time as the listing beside the raw area
  recorded for the snapshot's manifests as they are): kept where it is, nothing read;
- **new or changed**: read once, decoded in full in worker processes, hashed, and written to
  new shards in path order (a changed file whose bytes turn out the same is kept where it is).
The previous snapshot's shards are then carried over: hard-linked when every image in them is
kept, rewritten without the images that are gone (only the shards a removal touches), dropped
when empty. An append therefore writes new shards and leaves the old ones byte-identical, so
`dvc add` hashes and `dvc push` uploads only the new ones.

A fresh ingest writes the images in path order from key 0, so the same content gives the same
shards and the same data version whatever order the source lists its files in. An append
places its images after the existing ones: the version then records that history too.

The listing (`<raw_dir>.listing/shard-NNNNNN.csv`: path, size, mtime of each image of that
shard, headed by the sha256 of the shard's manifest) sits beside the raw area, like the ingest
report, not in the data version. A shard's listing is trusted only while its manifest has those
bytes; without it (a second clone, or after a `dvc checkout` of another version) the shard's
files are read and hashed once, and those whose bytes are in its manifest are still kept where
they are. Per shard, like the manifests, so an append writes the new shards' listings alone.
"""

from __future__ import annotations

import csv
import gc
import hashlib
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
    listing_dir,
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

LISTING_FIELDS = ("path", "size", "mtime")
LISTING_HEAD = "# manifest sha256 "

# What the previous snapshot holds of a path: (size, mtime) of its file when it was read, and
# its shard; (-1, -1) when not known (no listing), so that the file is read. Plain tuples: a
# million of them are read on every ingest.
Known = tuple[int, int, str]


def manifest_sha(raw: Path, shard: str) -> str:
    return hashlib.sha256((raw / MANIFEST_DIR / f"{shard}.csv").read_bytes()).hexdigest()


def read_listing(raw: Path, shard: str) -> dict[str, Known] | None:
    """A shard's listing beside `raw`, if it was written for the manifest the shard has now."""
    try:
        with open(listing_dir(raw) / f"{shard}.csv", newline="") as fh:
            if fh.readline() != f"{LISTING_HEAD}{manifest_sha(raw, shard)}\n":
                return None  # another snapshot's (a dvc checkout since): its files are read
            rows = csv.reader(fh)
            if tuple(next(rows, ())) != LISTING_FIELDS:
                return None
            return {path: (int(size), int(mtime), shard) for path, size, mtime in rows}
    except (OSError, ValueError, csv.Error):
        return None


def write_listing(raw: Path, shard: str, rows: list[tuple[str, int, int]]) -> None:
    folder = listing_dir(raw)
    folder.mkdir(exist_ok=True)
    with open(folder / f"{shard}.csv", "w", newline="") as fh:
        fh.write(f"{LISTING_HEAD}{manifest_sha(raw, shard)}\n")
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(LISTING_FIELDS)
        writer.writerows(rows)


class Previous:
    """The previous snapshot: its shards (those whose tar is there: a missing one's images are
    read from the source again), what it holds of each path, and its manifests, read when
    needed (an unchanged re-ingest reads none). Unreadable manifests leave it empty: the
    ingest then starts afresh (the versions already recorded stay in DVC's cache and remote)."""

    def __init__(self, raw: Path) -> None:
        self.raw = raw
        self.trusted: set[str] = set()  # shards whose listing holds
        self.index: dict[str, Known] = {}
        self._records: dict[str, list[Record]] = {}
        self._sha: dict[str, str] = {}
        self._hashed: set[str] = set()
        self.shards = [s for s in shard_names(raw) if (raw / SHARDS_DIR / f"{s}.tar").is_file()]
        try:
            for shard in self.shards:
                listed = read_listing(raw, shard)
                if listed is None:
                    listed = {r.path: (-1, -1, shard) for r in self.records(shard)}
                else:
                    self.trusted.add(shard)
                self.index.update(listed)
        except (OSError, ValueError, csv.Error) as exc:
            log.warning(
                "previous snapshot in %s unreadable (%s): every image is read again", raw, exc
            )
            self.shards, self.trusted, self.index = [], set(), {}

    def records(self, shard: str) -> list[Record]:
        if shard not in self._records:
            self._records[shard] = read_manifest(self.raw, shard)
        return self._records[shard]

    def sha256(self, rel: str) -> str:
        """The content hash the snapshot holds for `rel` (its shard's manifest is read once)."""
        shard = self.index[rel][2]
        if shard not in self._hashed:
            self._hashed.add(shard)
            self._sha.update((r.path, r.sha256) for r in self.records(shard))
        return self._sha[rel]

    def next_key(self) -> int:
        """The first key after every key the snapshot used (new images go to new, later
        shards, so the last shard holds the largest)."""
        return (
            max((int(r.key) + 1 for r in self.records(self.shards[-1])), default=0)
            if self.shards
            else 0
        )

    def next_shard(self) -> int:
        return shard_index(self.shards[-1]) + 1 if self.shards else 0


class _Pending(NamedTuple):
    """A new or changed image: where to read it (the folder's file or a spooled copy)."""

    rel: str
    path: str
    size: int
    mtime: int


def _list_source(
    entries: Iterator[Entry], kind: str, source: str, spool: Path, index: dict[str, Known]
) -> tuple[dict[str, Known], list[_Pending]]:
    """Split the source's entries (the first of a repeated path) into the unchanged (what the
    snapshot holds of them), and the pending ones to read; archive members and S3 objects of
    the pending are copied to `spool` (a folder's files are read in place)."""
    kept: dict[str, Known] = {}
    pending: list[_Pending] = []
    downloads = []
    seen: set[str] = set()  # an archive or bucket may list a path twice; a folder cannot
    dedupe = kind != "folder"
    try:
        for entry in tqdm(entries, desc="list", unit="file", mininterval=2.0, disable=None):
            rel = entry.rel
            if dedupe:
                if rel in seen:
                    continue
                seen.add(rel)
            mtime = int(entry.mtime)
            known = index.get(rel)
            if known is not None and known[0] == entry.size and known[1] == mtime:
                kept[rel] = known
                continue
            if entry.path is not None:
                pending.append(_Pending(rel, entry.path, entry.size, mtime))
                continue
            dest = spool / str(len(pending))
            item = _Pending(rel, str(dest), entry.size, mtime)
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
    return kept, pending


def _carry_over(prev: Previous, staging: Path, kept: dict[str, Known], relisted: set[str]) -> None:
    """The previous snapshot's shards in `staging`: linked when whole, rewritten without the
    images that are gone, left out when none is kept; with their listings (linked when the
    shard's files are as listed, else written anew)."""
    gone = prev.index.keys() - kept.keys()
    shrunk = {prev.index[rel][2] for rel in gone}
    for shard in prev.shards:
        if shard in shrunk:
            records = prev.records(shard)
            keep = [r for r in records if r.path in kept]
            if not keep:
                continue
            rewrite_without(prev.raw, staging, shard, keep)
            log.info("rewrote %s without %d removed image(s)", shard, len(records) - len(keep))
        else:
            for folder, suffix in ((SHARDS_DIR, ".tar"), (MANIFEST_DIR, ".csv")):
                link_or_copy(
                    prev.raw / folder / f"{shard}{suffix}", staging / folder / f"{shard}{suffix}"
                )
            if shard in prev.trusted and shard not in relisted:
                listing_dir(staging).mkdir(exist_ok=True)
                name = f"{shard}.csv"
                link_or_copy(listing_dir(prev.raw) / name, listing_dir(staging) / name)
                continue
            keep = prev.records(shard)
        write_listing(staging, shard, [(r.path, *kept[r.path][:2]) for r in keep])


def _recheck_sizes(prev: Previous, kept: dict[str, Known], limit: int) -> list[dict]:
    """The kept images over `limit` (data.max_image_pixels, lowered since the last ingest),
    taken out of `kept`, as bad images with the reason."""
    bad = []
    for shard in prev.shards:
        records = {r.member: r for r in prev.records(shard) if r.path in kept}
        if not records:
            continue
        for name, data in shard_members(prev.raw, shard):
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
    prev = Previous(old_raw)
    spool = staging / ".spool"
    spool.mkdir(parents=True)
    kept, pending = _list_source(entries, kind, source, spool, prev.index)
    if not kept and not pending:
        what = "archive" if kind == "archive" else "data source"
        raise NoImages(
            f"{what} {source} holds no images (looked for "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
            + (f"; {len(unsafe)} unsafe entries were refused" if unsafe else "")
        )
    for folder in (SHARDS_DIR, MANIFEST_DIR):
        (staging / folder).mkdir()
    bad: list[dict] = []
    new: dict[str, Known] = {}
    relisted: set[str] = set()  # kept shards whose files were touched: listed anew
    writer: ShardWriter | None = None
    next_key = 0
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
        known = prev.index.get(item.rel)
        if known is not None and prev.sha256(item.rel) == digest:
            kept[item.rel] = (item.size, item.mtime, known[2])  # touched, not changed
            relisted.add(known[2])
            continue
        if cfg.data.on_bad_image == "fail" and (bad or unsafe):
            continue  # the ingest stops below: nothing more to write
        if writer is None:
            # new images are numbered after every key, and shard, the previous snapshot used
            writer = ShardWriter(staging, prev.next_shard(), cfg.data.shard_bytes)
            next_key = prev.next_key()
        record = Record(key_of(next_key), item.rel, digest, label_of(item.rel), len(data))
        next_key += 1
        writer.add(record, data)
        new[item.rel] = (item.size, item.mtime, writer.written[-1])
    if cfg.data.max_image_pixels < previous_limit(old_raw):
        # kept images passed a looser size rule: their headers are read again from the shards
        bad += _recheck_sizes(prev, kept, cfg.data.max_image_pixels)
    report.skipped = bad_image_policy(cfg, source, unsafe, bad)
    if writer is not None:
        writer.close()
        listed: dict[str, list[tuple[str, int, int]]] = {s: [] for s in writer.written}
        for rel, (size, mtime, shard) in new.items():
            listed[shard].append((rel, size, mtime))
        for shard, rows in listed.items():
            write_listing(staging, shard, rows)
    shutil.rmtree(spool)
    _carry_over(prev, staging, kept, relisted)
    report.reused, report.fetched = len(kept), len(new)
    report.images = report.reused + report.fetched
    if report.images == 0:
        raise NoImages(
            f"data source {source} holds no usable images ({len(report.skipped)} unusable): see "
            "the reasons above"
        )
    report.removed = len(prev.index.keys() - kept.keys() - new.keys())
    return report
