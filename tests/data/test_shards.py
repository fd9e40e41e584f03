"""The sharded snapshot: WebDataset tars + a manifest per shard; appends write new shards,
removals rewrite only theirs, the same content gives the same data version, prepare from
shards equals prepare from one file per image."""

import hashlib
import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_pipeline import versioning
from vae_pipeline.config import build_config
from vae_pipeline.data import shard_ingest
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.shards import manifest, shard_names
from vae_pipeline.data.sources import listing_dir, snapshot_source

from ..conftest import tiny_params
from .conftest import file_tree, snapshot_images


def _png(seed: int, size=(12, 10)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root: Path, n: int, start: int = 0) -> Path:
    for i in range(start, start + n):
        label = root / ("cats" if i % 2 else "dogs")
        label.mkdir(parents=True, exist_ok=True)
        (label / f"img{i:03d}.png").write_bytes(_png(i, (12 + i % 7, 10)))
    return root


def _cfg(source, **data):
    params = tiny_params()
    params["data"].update(source=str(source), shard_bytes=8192, **data)
    return build_config(params)


def _shards(raw: Path) -> dict[str, bytes]:
    return file_tree(raw / "shards") | file_tree(raw / "manifest")


def test_shards_follow_the_webdataset_layout_and_the_manifest_lists_every_image(tmp_path):
    src = _folder(tmp_path / "src", 30)
    (src / "top.png").write_bytes(_png(500))  # no label folder
    snapshot_source(_cfg(src), tmp_path)
    raw = tmp_path / "data/raw"
    records = manifest(raw)
    assert len(shard_names(raw)) > 1  # 8 KiB shards: several
    assert sorted(r.path for r in records) == sorted(file_tree(src))
    seen = {}
    for shard in shard_names(raw):
        with tarfile.open(raw / "shards" / f"{shard}.tar") as tf:
            members = tf.getmembers()
            assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(0, 0, 0, 0o644)}
            # WebDataset groups by the name up to the first dot: one image and its json per key
            keys = {}
            for m in members:
                key, ext = m.name.split(".", 1)
                keys.setdefault(key, {})[ext] = tf.extractfile(m).read()
        for key, files in keys.items():
            assert set(files) == {"png", "json"}
            seen[key] = files
    for r in records:
        meta = json.loads(seen[r.key]["json"])
        assert meta == {"path": r.path, "label": r.path.split("/")[0] if "/" in r.path else ""}
        assert seen[r.key]["png"] == (src / r.path).read_bytes()
        assert hashlib.sha256(seen[r.key]["png"]).hexdigest() == r.sha256
        assert r.bytes == len(seen[r.key]["png"])
    # no shard is over the size, unless a single image is
    for shard in shard_names(raw):
        assert (raw / "shards" / f"{shard}.tar").stat().st_size <= 8192 + 10240  # + tar's end


def test_an_append_writes_new_shards_and_leaves_the_old_ones_byte_identical(tmp_path):
    src = _folder(tmp_path / "src", 40)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    before = _shards(raw)
    listed = {p.name: p.stat().st_ino for p in listing_dir(raw).iterdir()}
    _folder(src, 6, start=40)
    report = snapshot_source(cfg, tmp_path)
    after = _shards(raw)
    assert (report.fetched, report.reused) == (6, 40)
    # the old shards' listings are kept (linked), the new shards get their own
    now = {p.name: p.stat().st_ino for p in listing_dir(raw).iterdir()}
    assert {k: now[k] for k in listed} == listed and len(now) > len(listed)
    assert {k: after[k] for k in before} == before  # every old shard and manifest unchanged
    new = sorted(set(after) - set(before))
    assert new and all(k.startswith("shard-") for k in new)
    added = {r.path for r in manifest(raw) if f"{r.shard}.tar" in new}
    assert added == {f"{'cats' if i % 2 else 'dogs'}/img{i:03d}.png" for i in range(40, 46)}
    assert snapshot_images(raw) == file_tree(src)


def test_a_removal_rewrites_only_the_shard_that_held_the_image(tmp_path):
    src = _folder(tmp_path / "src", 40)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    before = _shards(raw)
    holder = next(r.shard for r in manifest(raw) if r.path == "cats/img021.png")
    (src / "cats/img021.png").unlink()
    report = snapshot_source(cfg, tmp_path)
    after = _shards(raw)
    assert (report.removed, report.fetched) == (1, 0)
    changed = {k for k in before if after.get(k) != before[k]}
    assert changed == {f"{holder}.tar", f"{holder}.csv"}
    assert set(after) == set(before)
    assert snapshot_images(raw) == file_tree(src)


def test_the_same_content_gives_the_same_version_whatever_the_listing_order(tmp_path):
    src = _folder(tmp_path / "src", 30)
    files = file_tree(src)
    # the same files in a tar, listed in reverse order, with other times and owners
    archive = tmp_path / "rev.tar"
    with tarfile.open(archive, "w") as tf:
        for i, (name, data) in enumerate(reversed(list(files.items()))):
            info = tarfile.TarInfo(f"photos/{name}")
            info.size, info.mtime, info.uid = len(data), 1_600_000_000 + 97 * i, 1000 + i
            tf.addfile(info, io.BytesIO(data))
    # and a copy of the folder, its files written in another order (other inodes and times)
    copy = tmp_path / "copy"
    for name in sorted(files, reverse=True):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes(files[name])
        os.utime(copy / name, (1_500_000_000, 1_500_000_000))
    versions = set()
    for source in (src, archive, copy):
        ws = tmp_path / f"ws-{Path(source).name}"
        ws.mkdir()
        snapshot_source(_cfg(source), ws)
        versions.add(versioning.version_data(_cfg(source), ws, push=False))
    assert len(versions) == 1
    # and other content does not
    (copy / "dogs/img000.png").write_bytes(_png(999))
    snapshot_source(_cfg(copy), tmp_path / "ws-copy")
    assert versioning.version_data(_cfg(copy), tmp_path / "ws-copy", push=False) not in versions


def test_an_unchanged_reingest_reads_no_image(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", 30)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    before = _shards(raw)
    inodes = {p.name: p.stat().st_ino for p in (raw / "shards").iterdir()}

    def no_reads(args):
        raise AssertionError(f"{args[0]} was read again")

    monkeypatch.setattr(shard_ingest, "ingest_worker", no_reads)
    report = snapshot_source(cfg, tmp_path)
    assert (report.fetched, report.reused, report.images) == (0, 30, 30)
    assert _shards(raw) == before
    assert {p.name: p.stat().st_ino for p in (raw / "shards").iterdir()} == inodes  # linked
    # a touched file (same bytes, new time) is read and hashed, and kept where it is
    monkeypatch.undo()
    os.utime(src / "dogs/img000.png", (1_700_000_000, 1_700_000_000))
    report = snapshot_source(cfg, tmp_path)
    assert (report.fetched, report.reused) == (0, 30) and _shards(raw) == before


def test_without_the_listing_every_file_is_hashed_and_the_shards_are_kept(tmp_path):
    """A second clone has the snapshot (dvc pull) but not the listing beside it."""
    src = _folder(tmp_path / "src", 30)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    before = _shards(raw)
    shutil.rmtree(listing_dir(raw))
    report = snapshot_source(cfg, tmp_path)
    assert (report.fetched, report.reused) == (0, 30)
    assert _shards(raw) == before
    assert sorted(p.stem for p in listing_dir(raw).iterdir()) == shard_names(raw)


def test_a_listing_written_for_other_manifests_is_not_trusted(tmp_path):
    """Two appends from the same version give two different shards of the same name. After
    a `dvc checkout` of the other one, the listing beside the raw area describes the wrong
    shard: the files it lists are read again, not taken from the shard checked out."""
    src = _folder(tmp_path / "src", 20)
    cfg = _cfg(src)
    raw = tmp_path / "data/raw"

    def checkout(version: str) -> None:  # what `dvc checkout` does to the raw area
        shutil.rmtree(raw)
        shutil.copytree(tmp_path / version, raw)

    snapshot_source(cfg, tmp_path)
    shutil.copytree(raw, tmp_path / "v0")
    for i in range(3):
        (src / f"new{i}.png").write_bytes(_png(100 + i))
    snapshot_source(cfg, tmp_path)
    shutil.copytree(raw, tmp_path / "branch-b")
    checkout("v0")
    for i in range(3):  # the same names, other images
        (src / f"new{i}.png").write_bytes(_png(200 + i, (14, 9)))
    snapshot_source(cfg, tmp_path)  # branch a: its new shard has branch b's name
    assert set(shard_names(raw)) == set(shard_names(tmp_path / "branch-b"))
    checkout("branch-b")
    report = snapshot_source(cfg, tmp_path)
    assert report.fetched == 3  # read: branch b's shard holds other bytes under these names
    assert snapshot_images(raw) == file_tree(src)


def test_a_changed_image_moves_to_a_new_shard(tmp_path):
    src = _folder(tmp_path / "src", 20)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    old = {r.path: r for r in manifest(raw)}
    (src / "dogs/img004.png").write_bytes(_png(777, (20, 20)))
    report = snapshot_source(cfg, tmp_path)
    new = {r.path: r for r in manifest(raw)}
    assert (report.fetched, report.reused, report.images) == (1, 19, 20)
    assert int(new["dogs/img004.png"].key) > max(int(r.key) for r in old.values())
    assert snapshot_images(raw) == file_tree(src)


@pytest.mark.parametrize("workers", [1, 2])
def test_prepare_from_shards_equals_prepare_from_one_file_per_image(tmp_path, pools, workers):
    src = _folder(tmp_path / "src", 70)
    (src / "dogs/copy.png").write_bytes((src / "cats/img001.png").read_bytes())  # a duplicate
    Image.new("RGB", (48, 40), (200, 10, 10)).save(src / "big.png")  # resized, not padded
    prepared = {}
    for layout in ("files", "shards"):
        ws = tmp_path / layout
        cfg = _cfg(src, layout=layout, limit=None, channels=3, decode_workers=workers)
        snapshot_source(cfg, ws)
        prepare(cfg, ws, data_version="v")
        prepared[layout] = file_tree(ws / "data/prepared")
    assert prepared["files"] == prepared["shards"]  # every array, index.csv and manifest.json
    assert pools == ([2, 2, 2, 2] if workers == 2 else [])  # ingest and prepare, each layout


def test_prepare_names_a_shard_that_lost_an_image(tmp_path):
    src = _folder(tmp_path / "src", 20)
    cfg = _cfg(src, on_bad_image="fail", test_fraction=0.3)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    shard = shard_names(raw)[0]
    tar = raw / "shards" / f"{shard}.tar"
    with tarfile.open(tar) as tf:
        kept = [(m, tf.extractfile(m).read()) for m in tf.getmembers()[2:]]
    tar.unlink()
    with tarfile.open(tar, "w") as tf:
        for m, data in kept:
            tf.addfile(m, io.BytesIO(data))
    with pytest.raises(Exception, match=f"{shard}: planned image missing"):
        prepare(cfg, tmp_path)
    assert not (tmp_path / "data/prepared").exists()
    shutil.rmtree(src)


def test_a_lost_shard_or_a_broken_manifest_is_read_again_from_the_source(tmp_path, caplog):
    src = _folder(tmp_path / "src", 30)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    before = _shards(raw)
    lost = shard_names(raw)[1]
    lost_images = [r.path for r in manifest(raw) if r.shard == lost]
    (raw / "shards" / f"{lost}.tar").unlink()
    report = snapshot_source(cfg, tmp_path)
    assert report.fetched == len(lost_images) and report.reused == 30 - len(lost_images)
    assert snapshot_images(raw) == file_tree(src)
    after = _shards(raw)
    others = [k for k in before if not k.startswith(lost)]
    assert {k: after[k] for k in others} == {k: before[k] for k in others}  # kept as they were
    assert not any(k.startswith(lost) for k in after)  # the lost images went to new shards
    (raw / "manifest" / f"{shard_names(raw)[0]}.csv").write_text("not,a,manifest\n")
    report = snapshot_source(cfg, tmp_path)
    assert "every image is read again" in caplog.text
    assert (report.fetched, report.reused) == (30, 0)
    assert snapshot_images(raw) == file_tree(src)
