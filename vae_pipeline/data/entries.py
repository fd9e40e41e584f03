"""The files of a folder, a .zip/.tar(.gz) archive or an s3:// prefix, as entries to snapshot:
unsafe names refused (absolute, `..`, links, devices), archives read without extracting
anything outside the target, S3 errors named with the fix."""

from __future__ import annotations

import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath

from vae_pipeline.data.errors import DataError, SourceUnreachable
from vae_pipeline.data.images import (
    IMAGE_EXTENSIONS,
    is_image_name,
    utf8_name,
)

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


@dataclass(slots=True)
class Entry:
    """One image of a source: where it goes in the snapshot, and how to fetch its bytes (a
    folder's file has a `path` and is read where it is; the others have a `fetcher`)."""

    rel: str
    size: int
    mtime: float
    fetcher: Callable[[Path], None] | None = None
    path: str | None = None

    def fetch(self, dest: Path) -> None:
        if self.fetcher is None:
            shutil.copyfile(self.path, dest)
        else:
            self.fetcher(dest)


def unsafe_reason(name: str) -> str | None:
    """Why an archive entry or S3 key may not be written below the snapshot, or None."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "path traversal (..)"
    return None


def _clean_rel(name: str) -> str:
    return "/".join(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))


def scan_folder(src: Path, refused: list[dict], ignored: list[dict]) -> Iterator[Entry]:
    """One walk of a folder (os.scandir: one lstat per image): its images as entries, and
    what `list_images` leaves out, with reasons, added to `refused` (links and
    names that are not UTF-8) and `ignored` (other files). Links are not followed."""
    supported = " ".join(sorted(IMAGE_EXTENSIONS))
    stack = [("", str(src), True)]
    while stack:
        prefix, folder, utf8 = stack.pop()
        with os.scandir(folder) as it:
            items = list(it)
        # one check of all the folder's names; a folder with a name that is not UTF-8 (rare)
        # checks each name (this loop runs once per file: a million at scale)
        all_utf8 = utf8 and utf8_name("/".join([item.name for item in items]))
        for item in items:
            name = item.name
            rel = prefix + name
            if item.is_file(follow_symlinks=False) and (all_utf8 or (utf8 and utf8_name(name))):
                dot = name.rfind(".")  # os.path.splitext's extension, without its cost
                ext = name[dot:].lower() if dot > 0 and name[:dot].strip(".") else ""
                if ext in IMAGE_EXTENSIONS:
                    st = item.stat(follow_symlinks=False)
                    yield Entry(rel, st.st_size, st.st_mtime, None, item.path)
                else:
                    ignored.append({"path": rel, "reason": f"not an image type read here "
                                    f"({ext or 'no extension'}; supported: {supported})"})  # fmt: skip
            elif not (all_utf8 or (utf8 and utf8_name(name))):
                shown = repr(os.fsencode(rel))[2:-1]  # the bytes, escaped: x\\xff.png
                refused.append({"path": shown, "reason": "file name is not valid UTF-8: rename it"})
                if item.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", item.path, False))
            elif item.is_dir(follow_symlinks=False):
                stack.append((rel + "/", item.path, True))
            elif item.is_symlink():
                refused.append({"path": rel, "reason": "symbolic link (not followed: it could "
                                "point anywhere; copy the file itself into the folder)"})  # fmt: skip
    by_parts = lambda item: item["path"].split("/")  # noqa: E731 - sorted as Paths sort
    refused.sort(key=by_parts)
    ignored.sort(key=by_parts)


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


def zip_entries(archive: Path, unsafe: list[dict]) -> Iterator[Entry]:
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
                None,
            )


def tar_entries(archive: Path, unsafe: list[dict]) -> Iterator[Entry]:
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


def s3_entries(url: str, unsafe: list[dict]) -> Iterator[Entry]:
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
