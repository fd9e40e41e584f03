"""What both snapshot layouts share: a source's kind and entries, the ingest report, the
bad-file policy (data.on_bad_image), and where a sharded snapshot's listing is kept."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.data.entries import (
    ARCHIVE_SUFFIXES,
    Entry,
    s3_entries,
    scan_folder,
    tar_entries,
    zip_entries,
)
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.fixed_sources import FASHION_MNIST, IDX_PREFIX

log = logging.getLogger(__name__)

REPORT_NAME = "ingest_report.json"


@dataclass
class IngestReport:
    source: str
    kind: str
    raw_dir: str
    images: int = 0
    fetched: int = 0
    reused: int = 0
    removed: int = 0
    skipped: list[dict] = field(default_factory=list)
    # files that are not images of a supported type (a README, a .csv): listed, not an error
    ignored: list[dict] = field(default_factory=list)
    # the size limit every image in the snapshot was checked against (data.max_image_pixels)
    max_image_pixels: int | None = None

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")


def source_kind(source: str) -> str:
    if source == FASHION_MNIST:
        return "fashion-mnist"
    if source.startswith(IDX_PREFIX):
        return "idx"
    if source.startswith("s3://"):
        return "s3"
    if source.lower().endswith(ARCHIVE_SUFFIXES):
        return "archive"
    return "folder"


def report_path(cfg: Config, workdir: Path = Path(".")) -> Path:
    """The ingest report sits beside the raw area (not inside it: it is not part of the data)."""
    raw = (workdir / cfg.data.raw_dir).resolve()
    return raw.parent / REPORT_NAME


def listing_dir(raw: Path) -> Path:
    """Where a sharded snapshot's listing (path, size and mtime of each source file, a file per
    shard) is kept: beside the raw area, like the ingest report, not part of the data version."""
    return raw.with_name(raw.name + ".listing")


def previous_limit(old: Path) -> float:
    """data.max_image_pixels of the snapshot in `old`, from its ingest report (infinity when
    unknown: then every carried-over file is re-checked against the current limit)."""
    try:
        value = json.loads((old.parent / REPORT_NAME).read_text()).get("max_image_pixels")
    except (OSError, ValueError, AttributeError):
        return float("inf")
    return float(value) if isinstance(value, int) else float("inf")


def source_entries(
    kind: str, source: str, report: IngestReport, unsafe: list[dict]
) -> Iterator[Entry]:
    """The entries of a folder, archive or S3 source (read lazily, as they are fetched);
    unsafe ones go to `unsafe`, a folder's files that are not images to `report.ignored`."""
    if kind == "folder":
        src = Path(source)
        if not src.is_dir():
            raise DataError(
                f"data.source {source!r} is not 'fashion-mnist', an s3:// prefix, an archive "
                "(.zip .tar .tar.gz .tgz) or an existing folder of images: fix the path in "
                "params.yaml or with --source / --set data.source=PATH"
            )
        # links and names that are not UTF-8 go to `unsafe`: the policy (on_bad_image)
        # applies to them as to bad images; other files are listed as ignored, not an error
        entries: Iterator[Entry] = _logging_ignored(
            scan_folder(src, unsafe, report.ignored), report
        )
    elif kind == "archive":
        src = Path(source)
        if not src.is_file():
            raise DataError(f"archive {source} does not exist: fix data.source / --source")
        zipped = source.lower().endswith(".zip")
        entries = zip_entries(src, unsafe) if zipped else tar_entries(src, unsafe)
    else:
        entries = s3_entries(source, unsafe)
    return entries


def _logging_ignored(entries: Iterator[Entry], report: IngestReport) -> Iterator[Entry]:
    yield from entries
    for item in report.ignored:
        log.warning("ignoring %s: %s", item["path"], item["reason"])


def bad_image_policy(cfg: Config, source: str, unsafe: list[dict], bad: list[dict]) -> list[dict]:
    """data.on_bad_image: stop, naming the unusable files (fail), or log each file left out
    (skip). Returns the skipped (unsafe, then bad)."""
    skipped = unsafe + bad
    if skipped and cfg.data.on_bad_image == "fail":
        listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        raise DataError(
            f"{len(skipped)} unusable file(s) in {source}: {listing}{more}. Nothing was written; "
            "fix or remove them, or set data.on_bad_image=skip to leave them out"
        )
    for item in bad:
        log.warning("skipping %s: %s", item["path"], item["reason"])
    for item in unsafe:
        log.warning("skipping %s: %s", item["path"], item["reason"])
    return skipped


def link_or_copy(src: Path, dest: Path) -> None:
    """A file carried over from the previous snapshot: hard-linked (DVC then does not hash it
    again), copied where links are not possible."""
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)
