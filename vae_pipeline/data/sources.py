"""Snapshot a data source into the raw area (`data.raw_dir`), which DVC then versions.

Sources (`data.source`):
- `fashion-mnist`: the IDX files, as `FashionMNIST/raw/<IDX files>` (torchvision reads them there).
- `idx:<folder>`: any dataset in the four-file MNIST layout (MNIST, KMNIST, EMNIST, Fashion-MNIST),
  as `IDX/{train,t10k}-{images,labels}-...-ubyte` (decompressed), plus `IDX/classes.txt` (one
  label name per line) when the folder has one. The label files are optional.
- a folder of images, a `.zip` / `.tar` / `.tar.gz` / `.tgz` archive, or an S3 prefix
  `s3://bucket/prefix`: the image files as `images/<relative path>` (sub-folders are labels; an
  archive's single top-level folder is dropped).

The snapshot is built beside the raw area and swapped in at the end, so a failure half-way leaves
the previous snapshot as it was. Files whose size and modification time match the previous
snapshot are hard-linked from it rather than copied, extracted or downloaded again (DVC then
does not re-hash them either); only new and changed files are fetched and checked.

Every fetched file is decoded in full (in worker processes) before it enters the snapshot.
Unusable ones (corrupt, empty, truncated, not an image, over `data.max_image_pixels`) and unsafe
archive entries (absolute paths, `..`, links, devices) are, per `data.on_bad_image`, left out and
listed in the ingest report, or stop the ingest before anything is written.
"""

from __future__ import annotations

import gzip
import json
import logging
import multiprocessing
import os
import re
import shutil
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data.errors import DataError, NoImages, SourceUnreachable
from vae_pipeline.data.images import (
    IMAGE_EXTENSIONS,
    check_worker,
    is_image_name,
    left_out,
    list_images,
    pixel_check,
    utf8_name,
)

log = logging.getLogger(__name__)

FASHION_MNIST = "fashion-mnist"
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
INSTALL_HINT = (
    "install Debian's package (apt-get install dataset-fashion-mnist), point "
    "data.fashion_mnist_dir at a folder holding the IDX files, or set "
    "data.fashion_mnist_dir=null to let torchvision download them (needs network)"
)
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
REPORT_NAME = "ingest_report.json"
POOL_THRESHOLD = 4096  # fewer files are handled in-process: a pool costs 1-3 s to start (bench/)


@dataclass
class Entry:
    """One image of a source: where it goes in the snapshot, and how to fetch its bytes."""

    rel: str
    size: int
    mtime: float
    fetch: Callable[[Path], None]


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


def unsafe_reason(name: str) -> str | None:
    """Why an archive entry or S3 key may not be written below the snapshot, or None."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path traversal (..)"
    return None


def _clean_rel(name: str) -> str:
    return "/".join(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))


# --- Fashion-MNIST ------------------------------------------------------------------------------


def _copy_fashion_mnist(src_dir: Path, dest: Path) -> None:
    target = dest / "FashionMNIST" / "raw"
    target.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        plain, packed = src_dir / name, src_dir / f"{name}.gz"
        if plain.is_file():
            shutil.copyfile(plain, target / name)
        elif packed.is_file():
            with gzip.open(packed, "rb") as fin, open(target / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            raise DataError(
                f"Fashion-MNIST file {name}(.gz) not found in {src_dir}: {INSTALL_HINT}"
            )


def _fashion_mnist_count(dest: Path) -> int:
    raw = dest / "FashionMNIST" / "raw"
    total = 0
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        with open(raw / name, "rb") as fh:
            total += int.from_bytes(fh.read(8)[4:8], "big")  # IDX header: magic, count
    return total


def _download_fashion_mnist(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(root=str(dest), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading Fashion-MNIST failed ({exc}): {INSTALL_HINT}") from exc
    for gz in (dest / "FashionMNIST" / "raw").glob("*.gz"):
        gz.unlink()  # keep one copy of the data in the versioned snapshot


# --- IDX (the MNIST layout) ---------------------------------------------------------------------

IDX_PREFIX = "idx:"
IDX_DIR = "IDX"  # the snapshot's folder of an idx: source
IDX_CLASSES = "classes.txt"
# train-images-idx3-ubyte, t10k-labels-idx1-ubyte.gz, emnist-digits-test-images-idx3-ubyte,
# train-images.idx3-ubyte: (prefix)(train|t10k|test)-(images|labels)[-.]idx(3|1)-ubyte(.gz)
_IDX_NAME = re.compile(r"(?:^|-)(train|t10k|test)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")
IDX_ROLES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    """The folder's IDX files by (split, kind); refuses a folder with two candidates for one
    role (e.g. several EMNIST splits side by side) or without both image files."""
    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _IDX_NAME.search(path.name)
        if match and path.is_file():
            split = "train" if match.group(1) == "train" else "test"
            found.setdefault((split, match.group(2)), []).append(path)
    for role, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise DataError(
                f"{folder} holds several {role[0]} {role[1]} IDX files ({names}): point "
                "data.source at a folder with one dataset's four files"
            )
    missing = [IDX_ROLES[r] for r in (("train", "images"), ("test", "images")) if r not in found]
    if missing:
        raise DataError(
            f"{folder} has no {' or '.join(missing)}(.gz): an idx: source needs the MNIST "
            "layout (train-images-idx3-ubyte, t10k-images-idx3-ubyte, and optionally the "
            "two -labels-idx1-ubyte files), plain or gzipped"
        )
    return {role: paths[0] for role, paths in found.items()}


def _copy_idx(src_dir: Path, dest: Path) -> int:
    """Copy (decompressing) an IDX folder into dest/IDX; returns the number of images."""
    if not src_dir.is_dir():
        raise DataError(
            f"data.source idx:{src_dir}: no such folder; point it at a folder holding the "
            "MNIST-layout IDX files"
        )
    target = dest / IDX_DIR
    target.mkdir(parents=True)
    total = 0
    for role, path in idx_files(src_dir).items():
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fin, open(target / IDX_ROLES[role], "wb") as fout:
            shutil.copyfileobj(fin, fout)
        if role[1] == "images":
            with open(target / IDX_ROLES[role], "rb") as fh:
                total += int.from_bytes(fh.read(8)[4:8], "big")
    if (src_dir / IDX_CLASSES).is_file():
        shutil.copyfile(src_dir / IDX_CLASSES, target / IDX_CLASSES)
    return total


# --- folder, archive and S3 entries -------------------------------------------------------------


def _folder_entries(src: Path) -> Iterator[Entry]:
    for path in list_images(src):
        st = path.stat()
        yield Entry(
            path.relative_to(src).as_posix(),
            st.st_size,
            st.st_mtime,
            lambda dest, path=path: shutil.copyfile(path, dest),
        )


def _copy_stream(fileobj, dest: Path) -> None:
    with fileobj, open(dest, "wb") as out:
        shutil.copyfileobj(fileobj, out, 1 << 20)


def _common_top(names: list[str]) -> str:
    """`dataset/` when every image in the archive sits below that one folder, else ``."""
    rels = [_clean_rel(n) for n in names if is_image_name(n) and unsafe_reason(n) is None]
    tops = {r.split("/", 1)[0] for r in rels}
    if len(tops) == 1 and all("/" in r for r in rels):
        return tops.pop() + "/"
    return ""


def _zip_entries(archive: Path, unsafe: list[dict]) -> Iterator[Entry]:
    with zipfile.ZipFile(archive) as zf:
        top = _common_top([i.filename for i in zf.infolist() if not i.is_dir()])
        for info in zf.infolist():
            if info.is_dir() or not is_image_name(info.filename):
                continue
            reason = unsafe_reason(info.filename)
            if reason is None and (info.external_attr >> 16) & 0o170000 == 0o120000:
                reason = "symbolic link"
            if reason:
                unsafe.append({"path": info.filename, "reason": f"unsafe archive entry: {reason}"})
                continue
            mtime = datetime(*info.date_time).timestamp()
            yield Entry(
                _clean_rel(info.filename).removeprefix(top),
                info.file_size,
                mtime,
                lambda dest, info=info: _copy_stream(zf.open(info), dest),
            )


def _tar_entries(archive: Path, unsafe: list[dict]) -> Iterator[Entry]:
    # A first pass reads the names; the second streams through the (possibly compressed)
    # archive once, each entry fetched before the next member is read.
    with tarfile.open(archive, "r:*") as tf:
        top = _common_top([m.name for m in tf.getmembers() if not m.isdir()])
    with tarfile.open(archive, "r|*") as tf:
        for member in tf:
            if member.isdir() or not is_image_name(member.name):
                continue
            reason = unsafe_reason(member.name)
            if reason is None and not utf8_name(Path(member.name)):
                reason = "file name is not valid UTF-8: rename it"
            elif reason is None and member.issym():
                reason = "symbolic link"
            elif reason is None and member.islnk():
                reason = "hard link"
            elif reason is None and not member.isfile():
                reason = "not a regular file"
            if reason:
                unsafe.append({"path": member.name, "reason": f"unsafe archive entry: {reason}"})
                continue
            yield Entry(
                _clean_rel(member.name).removeprefix(top),
                member.size,
                float(member.mtime),
                lambda dest, member=member: _copy_stream(tf.extractfile(member), dest),
            )


def split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not bucket:
        raise DataError(f"data.source {url!r} names no bucket: use s3://bucket/prefix")
    return bucket, prefix.strip("/")


def s3_client():
    """boto3's S3 client: endpoint (AWS_ENDPOINT_URL[_S3]), region and credentials come from the
    standard AWS environment and profile chain; a few retries with backoff for transient errors."""
    import boto3
    from botocore.config import Config as BotoConfig

    # a new session each time: credentials are resolved now (a long-lived worker picks up
    # rotated keys), not cached from the first client of the process
    return boto3.session.Session().client(
        "s3",
        config=BotoConfig(
            retries={"max_attempts": 3, "mode": "standard"}, connect_timeout=5, read_timeout=60
        ),
    )


def s3_error(exc: Exception, url: str) -> DataError:
    """A boto3/botocore failure as a DataError that names the input and says what to do."""
    from botocore import exceptions as bx

    if isinstance(exc, bx.NoCredentialsError | bx.PartialCredentialsError):
        return DataError(
            f"no AWS credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "AWS_PROFILE (a profile in ~/.aws/credentials)"
        )
    if isinstance(exc, bx.EndpointConnectionError | bx.ConnectTimeoutError | bx.ReadTimeoutError):
        return SourceUnreachable(
            f"cannot reach the S3 endpoint for {url} ({exc}): check AWS_ENDPOINT_URL / the network"
        )
    if isinstance(exc, bx.ClientError):
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("NoSuchBucket", "404", "NotFound"):
            return DataError(f"S3 bucket of {url} does not exist: check data.source")
        if code in (
            "InvalidAccessKeyId",
            "SignatureDoesNotMatch",
            "AccessDenied",
            "403",
            "ExpiredToken",
            "InvalidToken",
        ):
            return DataError(
                f"S3 refused the credentials for {url} ({code}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY / AWS_PROFILE and the bucket policy"
            )
        return DataError(f"S3 request for {url} failed ({code}: {exc})")
    return DataError(f"S3 request for {url} failed ({exc})")


def _s3_entries(url: str, unsafe: list[dict]) -> Iterator[Entry]:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_url(url)
    client = s3_client()
    start = f"{prefix}/" if prefix else ""
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=start)
        objects = [obj for page in pages for obj in page.get("Contents", [])]
    except (BotoCoreError, ClientError) as exc:
        raise s3_error(exc, url) from exc
    if not objects:
        raise DataError(f"no objects under {url}: check the bucket and prefix in data.source")
    for obj in objects:
        key = obj["Key"]
        rel = key[len(start) :]
        if not rel or rel.endswith("/") or not is_image_name(rel):
            continue
        reason = unsafe_reason(rel)
        if reason:
            unsafe.append({"path": key, "reason": f"unsafe S3 key: {reason}"})
            continue

        def fetch(dest: Path, key: str = key) -> None:
            try:
                client.download_file(bucket, key, str(dest))
            except (BotoCoreError, ClientError) as exc:
                raise s3_error(exc, f"s3://{bucket}/{key}") from exc

        yield Entry(_clean_rel(rel), obj["Size"], obj["LastModified"].timestamp(), fetch)


# --- checking images in worker processes --------------------------------------------------------


def worker_count(cfg: Config) -> int:
    return cfg.data.decode_workers or len(os.sched_getaffinity(0))


def map_in_pool(fn, items: list, workers: int, desc: str, chunksize: int = 16) -> Iterator:
    """`map(fn, items)` in `workers` processes (forkserver: safe after torch has started
    threads), in order, with a progress bar on long runs; in-process when small."""
    bar = dict(desc=desc, unit="img", mininterval=2.0, disable=len(items) < 1000)
    if workers <= 1 or len(items) < POOL_THRESHOLD:
        yield from tqdm(map(fn, items), total=len(items), **bar)
        return
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        yield from tqdm(pool.map(fn, items, chunksize=chunksize), total=len(items), **bar)


# --- the snapshot -------------------------------------------------------------------------------


def _same_file(path: Path, entry: Entry) -> bool:
    try:
        st = path.stat()
    except OSError:
        return False
    return st.st_size == entry.size and int(st.st_mtime) == int(entry.mtime)


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _previous_limit(old: Path) -> float:
    """data.max_image_pixels of the snapshot in `old`, from its ingest report (infinity when
    unknown: then every carried-over file is re-checked against the current limit)."""
    try:
        value = json.loads((old.parent / REPORT_NAME).read_text()).get("max_image_pixels")
    except (OSError, ValueError, AttributeError):
        return float("inf")
    return float(value) if isinstance(value, int) else float("inf")


def _fill_images(cfg: Config, kind: str, source: str, staging: Path, old: Path) -> IngestReport:
    """Fetch the source's images into staging/images, reusing unchanged files from `old`."""
    report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
    unsafe: list[dict] = []
    if kind == "folder":
        src = Path(source)
        if not src.is_dir():
            raise DataError(
                f"data.source {source!r} is not 'fashion-mnist', an s3:// prefix, an archive "
                "(.zip .tar .tar.gz .tgz) or an existing folder of images: fix the path in "
                "params.yaml or with --source / --set data.source=PATH"
            )
        entries: Iterator[Entry] = _folder_entries(src)
        links, report.ignored = left_out(src)
        unsafe.extend(links)  # the policy (on_bad_image) applies to them like to bad images
        for item in report.ignored:
            log.warning("ignoring %s: %s", item["path"], item["reason"])
    elif kind == "archive":
        src = Path(source)
        if not src.is_file():
            raise DataError(f"archive {source} does not exist: fix data.source / --source")
        zipped = source.lower().endswith(".zip")
        entries = _zip_entries(src, unsafe) if zipped else _tar_entries(src, unsafe)
    else:
        entries = _s3_entries(source, unsafe)

    images = staging / "images"
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
                _link_or_copy(prior, dest)
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

    if not seen:
        what = "archive" if kind == "archive" else "data source"
        raise NoImages(
            f"{what} {source} holds no images (looked for "
            f"{' '.join(sorted(IMAGE_EXTENSIONS))}, recursively)"
            + (f"; {len(unsafe)} unsafe entries were refused" if unsafe else "")
        )

    checks = map_in_pool(
        check_worker,
        [(str(dest), cfg.data.max_image_pixels) for _, dest in fetched],
        worker_count(cfg),
        "check",
    )
    limit = cfg.data.max_image_pixels
    report.max_image_pixels = limit
    problems = list(zip(fetched, checks, strict=True))
    if limit < _previous_limit(old):  # carried-over files passed a looser rule: re-check sizes
        problems += [((rel, dest), pixel_check(dest, limit)) for rel, dest in reused]
    bad = [
        {"path": rel, "reason": problem.removeprefix(f"{dest}: ").replace(str(dest), rel)}
        for (rel, dest), problem in problems
        if problem is not None
    ]
    skipped = unsafe + bad
    if skipped and cfg.data.on_bad_image == "fail":
        listing = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:10])
        more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
        raise DataError(
            f"{len(skipped)} unusable file(s) in {source}: {listing}{more}. Nothing was written; "
            "fix or remove them, or set data.on_bad_image=skip to leave them out"
        )
    for item in bad:
        (images / item["path"]).unlink()
        log.warning("skipping %s: %s", item["path"], item["reason"])
    for item in unsafe:
        log.warning("skipping %s: %s", item["path"], item["reason"])
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
    old_images = old / "images"
    if old_images.is_dir():
        report.removed = sum(
            1 for p in list_images(old_images) if not (images / p.relative_to(old_images)).exists()
        )
    return report


def snapshot_source(cfg: Config, workdir: Path = Path(".")) -> IngestReport:
    """Make `data.raw_dir` a snapshot of `data.source` (replacing the previous one); the report
    (counts, skipped files and why) is also written to `ingest_report.json` beside it."""
    raw = (workdir / cfg.data.raw_dir).resolve()
    staging = raw.with_name(raw.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
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
                _download_fashion_mnist(staging)
            else:
                src_dir = Path(cfg.data.fashion_mnist_dir)
                if not src_dir.is_dir():
                    raise DataError(
                        f"Fashion-MNIST folder {src_dir} does not exist: {INSTALL_HINT}"
                    )
                _copy_fashion_mnist(src_dir, staging)
            report.images = report.fetched = _fashion_mnist_count(staging)
        elif kind == "idx":
            report = IngestReport(source=source, kind=kind, raw_dir=cfg.data.raw_dir)
            count = _copy_idx(Path(source[len(IDX_PREFIX) :]), staging)
            report.images = report.fetched = count
        else:
            report = _fill_images(cfg, kind, source, staging, raw)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = raw.with_name(raw.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if raw.exists():
        raw.rename(old)
    staging.rename(raw)
    shutil.rmtree(old, ignore_errors=True)
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
