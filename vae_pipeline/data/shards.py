"""The raw snapshot as shards: tar files in the WebDataset layout, and a manifest per shard.

    data/raw/shards/shard-000000.tar     {key}.{png,jpg,...} (the file's own bytes) + {key}.json
    data/raw/manifest/shard-000000.csv   key, path, sha256, label, bytes: one row per image

WebDataset's layout, so any reader of this field streams the shards as they are
(`webdataset.WebDataset("data/raw/shards/shard-{000000..000011}.tar")`, or plain `tar tf`).
Keys are serial numbers (`000000000123`), given once and never reused: a file's own name may
hold dots or share its stem with another file, which would break WebDataset's grouping by key.
`{key}.json` holds the image's path in the source and its label (the source's first-level
folder, "" without one); the label is a name, not a `.cls` index, because the indices would
change (and every shard with them) when a new label arrives.

Every member is written with the same owner, mode and time (0), and the manifest holds no
time either, so a shard's bytes, and the data version, depend on its images alone. A shard is
closed before it would grow past `data.shard_bytes` (an image larger than that gets one to
itself). The per-shard manifest keeps an append's push to the new shards: a single manifest of
every image would be rewritten, and pushed again, by every append.
"""

from __future__ import annotations

import csv
import io
import json
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from typing import NamedTuple

SHARDS_DIR = "shards"
MANIFEST_DIR = "manifest"
MANIFEST_FIELDS = ("key", "path", "sha256", "label", "bytes")
KEY_DIGITS = 12
BLOCK = 512


class Record(NamedTuple):
    """One image of the snapshot, as the manifest lists it (a tuple: a million are cheap)."""

    key: str
    path: str  # relative path in the source (POSIX)
    sha256: str
    label: str  # first-level folder of `path`, "" without one
    bytes: int
    shard: str = ""  # the shard's name, e.g. shard-000003

    @property
    def member(self) -> str:
        """The image's member name in the shard: key + the file's own extension."""
        return f"{self.key}{PurePosixPath(self.path).suffix.lower()}"


def label_of(rel: str) -> str:
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else ""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}"


def shard_index(name: str) -> int:
    return int(name.removeprefix("shard-"))


def key_of(serial: int) -> str:
    return f"{serial:0{KEY_DIGITS}d}"


def is_sharded(raw: Path) -> bool:
    return (raw / MANIFEST_DIR).is_dir()


def tar_size(data_bytes: int) -> int:
    """Bytes a member of `data_bytes` takes in a tar: its header and its padded data."""
    return BLOCK + -(-data_bytes // BLOCK) * BLOCK


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def meta_bytes(record: Record) -> bytes:
    return json.dumps({"path": record.path, "label": record.label}, sort_keys=True).encode()


class ShardWriter:
    """Writes images into shards `shard-{first:06d}.tar`, `...{first+1}`, each closed before it
    would pass `shard_bytes`; the manifest of each is written when it is closed."""

    def __init__(self, raw: Path, first: int, shard_bytes: int) -> None:
        self.raw, self.index, self.limit = raw, first, shard_bytes
        (raw / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        (raw / MANIFEST_DIR).mkdir(parents=True, exist_ok=True)
        self._tar: tarfile.TarFile | None = None
        self._rows: list[Record] = []
        self._size = 0
        self.written: list[str] = []

    def add(self, record: Record, data: bytes) -> None:
        need = tar_size(len(data)) + tar_size(len(meta_bytes(record)))
        if self._tar is not None and self._rows and self._size + need > self.limit:
            self.close_shard()
        if self._tar is None:
            name = shard_name(self.index)
            self._tar = tarfile.open(  # noqa: SIM115 - closed in close_shard
                self.raw / SHARDS_DIR / f"{name}.tar", "w", format=tarfile.USTAR_FORMAT
            )
            self.written.append(name)
        _member(self._tar, record.member, data)
        _member(self._tar, f"{record.key}.json", meta_bytes(record))
        self._rows.append(record)
        self._size += need

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        write_manifest(self.raw, shard_name(self.index), self._rows)
        self._tar, self._rows, self._size = None, [], 0
        self.index += 1

    def close(self) -> None:
        self.close_shard()


def write_manifest(raw: Path, shard: str, rows: Iterable[Record]) -> None:
    with open(raw / MANIFEST_DIR / f"{shard}.csv", "w", newline="") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow(MANIFEST_FIELDS)
        for r in rows:
            writer.writerow([r.key, r.path, r.sha256, r.label, r.bytes])


def shard_names(raw: Path) -> list[str]:
    """The shards of a sharded snapshot, in order."""
    return sorted(p.stem for p in (raw / MANIFEST_DIR).glob("shard-*.csv"))


def read_manifest(raw: Path, shard: str) -> list[Record]:
    with open(raw / MANIFEST_DIR / f"{shard}.csv", newline="") as fh:
        rows = csv.reader(fh)
        if tuple(next(rows, ())) != MANIFEST_FIELDS:
            raise ValueError(
                f"{raw / MANIFEST_DIR / shard}.csv: not a manifest of {MANIFEST_FIELDS}"
            )
        return [
            Record(key, path, sha, label, int(size), shard) for key, path, sha, label, size in rows
        ]


def manifest(raw: Path) -> list[Record]:
    """Every image of a sharded snapshot, shard by shard, in key order within each."""
    return [r for shard in shard_names(raw) for r in read_manifest(raw, shard)]


def shard_members(raw: Path, shard: str) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) of one shard, in order, streamed."""
    with tarfile.open(raw / SHARDS_DIR / f"{shard}.tar", "r|") as tf:
        for info in tf:
            if info.isfile():
                yield info.name, tf.extractfile(info).read()


def images_of(raw: Path) -> Iterator[tuple[Record, bytes]]:
    """Every image of a sharded snapshot with its bytes, shard by shard."""
    for shard in shard_names(raw):
        records = {r.member: r for r in read_manifest(raw, shard)}
        for name, data in shard_members(raw, shard):
            if name in records:
                yield records[name], data


def rewrite_without(old: Path, new: Path, shard: str, keep: list[Record]) -> None:
    """Shard `shard` of snapshot `old`, written to `new` with only the images in `keep`
    (same keys, same order): what a removal costs, one shard."""
    wanted = {r.member for r in keep} | {f"{r.key}.json" for r in keep}
    with tarfile.open(new / SHARDS_DIR / f"{shard}.tar", "w", format=tarfile.USTAR_FORMAT) as out:
        for name, data in shard_members(old, shard):
            if name in wanted:
                _member(out, name, data)
    write_manifest(new, shard, keep)
