"""Snapshots of folders and archives: incremental, safe with hostile archives, honest reports."""

import io
import json
import os
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vae_pipeline.config import build_config
from vae_pipeline.data.entries import unsafe_reason
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.sources import report_path, snapshot_source

from ..conftest import tiny_params
from .conftest import file_tree as _tree
from .conftest import snapshot_images


def _png(seed: int, size=(12, 10)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n=12, start=0):
    for i in range(start, start + n):
        label = "cats" if i % 2 else "dogs"
        (root / label).mkdir(parents=True, exist_ok=True)
        (root / label / f"img{i:03d}.png").write_bytes(_png(i))
    return root


def _cfg(source, **data):
    params = tiny_params()
    params["data"].update(source=str(source), **{"decode_workers": 2, **data})
    return build_config(params)


def test_folder_snapshot_mirrors_the_tree_and_writes_a_report(tmp_path):
    src = _folder(tmp_path / "src")
    (src / "README.txt").write_text("not an image: ignored")
    report = snapshot_source(_cfg(src), tmp_path)
    images = {k: v for k, v in _tree(src).items() if k.endswith(".png")}
    assert snapshot_images(tmp_path / "data/raw") == images
    assert (report.images, report.fetched, report.reused, report.skipped) == (12, 12, 0, [])
    saved = json.loads(report_path(_cfg(src), tmp_path).read_text())
    assert saved["images"] == 12 and saved["kind"] == "folder"
    assert not (tmp_path / "data/raw/ingest_report.json").exists()  # not part of the data
    # the files layout: the same images, one file each
    report = snapshot_source(_cfg(src, layout="files"), tmp_path / "files")
    assert _tree(tmp_path / "files/data/raw/images") == images


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_unchanged_files_are_reused_and_only_new_ones_fetched(tmp_path, layout):
    src = _folder(tmp_path / "src", n=40)
    cfg = _cfg(src, layout=layout)
    snapshot_source(cfg, tmp_path)
    raw = tmp_path / "data/raw"
    first = raw / ("shards/shard-000000.tar" if layout == "shards" else "images/dogs/img000.png")
    inode = first.stat().st_ino
    _folder(src, n=10, start=40)  # 10 new images
    (src / "cats/img005.png").unlink()  # one removed
    report = snapshot_source(cfg, tmp_path)
    assert (report.images, report.fetched, report.reused, report.removed) == (49, 10, 39, 1)
    assert snapshot_images(raw) == _tree(src)
    if layout == "shards":  # one shard: rewritten without the removed image
        assert first.stat().st_ino != inode
    else:
        assert first.stat().st_ino == inode  # linked, not copied again
    # a file changed in place (new size) is fetched again
    (src / "dogs/img000.png").write_bytes(_png(999, size=(13, 10)))
    report = snapshot_source(cfg, tmp_path)
    assert report.fetched == 1 and snapshot_images(raw) == _tree(src)


def _zip(path, files: dict[str, bytes], symlinks: dict[str, str] | None = None):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = 0o120777 << 16
            zf.writestr(info, target)
    return path


def _tar(path, files: dict[str, bytes], links: dict[str, tuple[bytes, str]] | None = None):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        for name, (kind, target) in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            tf.addfile(info)
    return path


def test_zip_and_tar_give_the_same_snapshot_as_the_folder(tmp_path):
    src = _folder(tmp_path / "src")
    files = {f"dataset/{k}": v for k, v in _tree(src).items()}  # one top folder: dropped
    for archive in (_zip(tmp_path / "d.zip", files), _tar(tmp_path / "d.tar.gz", files)):
        ws = tmp_path / archive.name.replace(".", "_")
        report = snapshot_source(_cfg(archive), ws)
        assert report.kind == "archive" and report.images == 12
        assert snapshot_images(ws / "data/raw") == _tree(src)


HOSTILE = {
    "../../escaped.png": "path traversal",
    "/tmp/absolute.png": "absolute path",
    "ok/../../../escaped2.png": "path traversal",
}


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_hostile_archive_entries_are_never_written_and_are_reported(tmp_path, fmt):
    good = {f"imgs/{i}.png": _png(i) for i in range(3)}
    hostile = {name: _png(100) for name in HOSTILE}
    archive = tmp_path / "sub" / f"a.{fmt}"
    archive.parent.mkdir()
    if fmt == "zip":
        _zip(archive, good | hostile, symlinks={"imgs/link.png": "/etc/passwd"})
    else:
        _tar(
            archive,
            good | hostile,
            links={
                "imgs/link.png": (tarfile.SYMTYPE, "/etc/passwd"),
                "imgs/hard.png": (tarfile.LNKTYPE, "/etc/passwd"),
            },
        )
    ws = tmp_path / "ws"
    report = snapshot_source(_cfg(archive), ws)
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    for name, why in HOSTILE.items():
        assert why in reasons[name]
    assert "symbolic link" in reasons["imgs/link.png"]
    if fmt != "zip":
        assert "hard link" in reasons["imgs/hard.png"]
    assert snapshot_images(ws / "data/raw") == {f"{i}.png": _png(i) for i in range(3)}
    assert list(tmp_path.rglob("escaped*.png")) == [] and not os.path.exists("/tmp/absolute.png")
    # the same archive under on_bad_image=fail: refused, naming an entry; the snapshot stays
    before = _tree(ws / "data/raw")
    with pytest.raises(DataError, match=r"unsafe archive entry.*Nothing was written"):
        snapshot_source(_cfg(archive, on_bad_image="fail"), ws)
    assert _tree(ws / "data/raw") == before


def test_unsafe_reason_cases():
    assert unsafe_reason("a/b.png") is None
    assert unsafe_reason("a/..b.png") is None  # a name, not a parent reference
    assert unsafe_reason("..\\..\\x.png") == "path traversal (..)"
    assert unsafe_reason("C:/x.png") == "absolute path"


def test_truncated_and_empty_archives(tmp_path):
    whole = _tar(tmp_path / "t.tar.gz", {f"{i}.png": _png(i) for i in range(20)}).read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DataError, match=r"cut\.tar\.gz cannot be read"):
        snapshot_source(_cfg(cut), tmp_path / "ws")
    bad_zip = tmp_path / "bad.zip"
    bad_zip.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match=r"bad\.zip cannot be read"):
        snapshot_source(_cfg(bad_zip), tmp_path / "ws")
    empty = _zip(tmp_path / "empty.zip", {"notes.txt": b"hello"})
    with pytest.raises(DataError, match=r"empty\.zip holds no images"):
        snapshot_source(_cfg(empty), tmp_path / "ws")
    with pytest.raises(DataError, match=r"missing\.zip does not exist"):
        snapshot_source(_cfg(tmp_path / "missing.zip"), tmp_path / "ws")
    assert not (tmp_path / "ws/data/raw").exists()


def _bad_files(src):
    (src / "dogs/empty.png").write_bytes(b"")
    (src / "dogs/notes.jpg").write_text("not an image")
    good = (src / "cats/img001.png").read_bytes()
    (src / "cats/truncated.png").write_bytes(good[: len(good) // 2])
    Image.new("L", (1200, 1000)).save(src / "cats/bomb.png")


def test_bad_images_are_left_out_and_listed_with_reasons(tmp_path):
    src = _folder(tmp_path / "src")
    _bad_files(src)
    cfg = _cfg(src, max_image_pixels=1_000_000)
    report = snapshot_source(cfg, tmp_path)
    reasons = {s["path"]: s["reason"] for s in report.skipped}
    assert set(reasons) == {
        "dogs/empty.png",
        "dogs/notes.jpg",
        "cats/truncated.png",
        "cats/bomb.png",
    }
    assert "empty file" in reasons["dogs/empty.png"]
    assert "truncated" in reasons["cats/truncated.png"]
    assert "max_image_pixels" in reasons["cats/bomb.png"]
    assert str(tmp_path / "data") not in json.dumps(reasons)  # reasons name the source path
    assert report.images == 12 and len(snapshot_images(tmp_path / "data/raw")) == 12
    assert json.loads(report_path(cfg, tmp_path).read_text())["skipped"] == report.skipped


def test_fail_policy_stops_before_anything_is_written(tmp_path):
    src = _folder(tmp_path / "src")
    snapshot_source(_cfg(src), tmp_path)
    before = _tree(tmp_path / "data/raw")
    report_before = report_path(_cfg(src), tmp_path).read_text()
    _bad_files(src)
    with pytest.raises(DataError, match=r"4 unusable file\(s\).*(empty|notes|truncated|bomb)"):
        snapshot_source(_cfg(src, on_bad_image="fail", max_image_pixels=1_000_000), tmp_path)
    assert _tree(tmp_path / "data/raw") == before
    assert report_path(_cfg(src), tmp_path).read_text() == report_before
    assert not (tmp_path / "data/raw.staging").exists()


def test_a_source_of_only_bad_files_is_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.png").write_bytes(b"")
    with pytest.raises(DataError, match="no usable images"):
        snapshot_source(_cfg(src), tmp_path)


def test_symlinks_in_a_folder_are_not_followed(tmp_path):
    src = _folder(tmp_path / "src", n=2)
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(5))
    (src / "dogs/link.png").symlink_to(outside)
    snapshot_source(_cfg(src), tmp_path)
    assert "dogs/link.png" not in snapshot_images(tmp_path / "data/raw")


def test_many_files_are_checked_in_worker_processes(tmp_path, pools):
    src = _folder(tmp_path / "src", n=80)  # above the (patched) in-process threshold
    (src / "dogs/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    report = snapshot_source(_cfg(src, decode_workers=2), tmp_path)
    assert report.images == 80 and [s["path"] for s in report.skipped] == ["dogs/broken.png"]
    assert pools == [2]
    shutil.rmtree(src)


def test_cli_ingest_source_flag_then_prepare(tmp_path, monkeypatch, capsys):
    from vae_pipeline.cli import main

    from ..conftest import make_workspace

    ws = make_workspace(tmp_path / "ws")
    archive = _zip(
        tmp_path / "photos.zip",
        {f"p/{k}": v for k, v in _tree(_folder(tmp_path / "src", n=30)).items()},
    )
    monkeypatch.chdir(ws)
    assert main(["ingest", "--source", str(archive), "--set", "data.test_fraction=0.3"]) == 0
    version = capsys.readouterr().out.strip().splitlines()[-1]
    assert len(version) == 32 and (ws / "data/raw.dvc").read_text().count(version) == 1
    # params.yaml still says fashion-mnist: prepare follows the snapshot's layout
    assert main(["prepare", "--set", "data.test_fraction=0.3"]) == 0
    manifest = json.loads((ws / "data/prepared/manifest.json").read_text())
    assert manifest["label_names"] == ["cats", "dogs"] and sum(manifest["counts"].values()) == 30
    assert manifest["data_version"] == version
    assert main(["ingest", "--source", str(tmp_path / "nope.tar.gz")]) == 1
    assert "nope.tar.gz does not exist" in capsys.readouterr().err


def test_links_and_other_file_types_are_reported_and_gif_tiff_are_read(tmp_path):
    src = _folder(tmp_path / "src", n=4)
    Image.fromarray(np.full((9, 9), 200, np.uint8)).save(src / "dogs" / "flat.gif")
    Image.fromarray(np.full((9, 9), 40000, np.uint16)).save(src / "dogs" / "deep.tif")
    (src / "notes.csv").write_text("a,b\n")
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png(99))
    (src / "cats" / "link.png").symlink_to(outside)
    report = snapshot_source(_cfg(src), tmp_path)
    assert report.images == 6  # 4 PNGs, the GIF and the TIFF
    assert {s["path"]: s["reason"][:13] for s in report.skipped} == {
        "cats/link.png": "symbolic link"
    }
    assert [i["path"] for i in report.ignored] == ["notes.csv"]
    assert "not an image type read here (.csv" in report.ignored[0]["reason"]
    saved = json.loads(report_path(_cfg(src), tmp_path).read_text())
    assert saved["skipped"] == report.skipped and saved["ignored"] == report.ignored
    # the policy applies to links as to every refused file: fail writes nothing
    before = _tree(tmp_path / "data/raw")
    with pytest.raises(DataError, match="cats/link.png: symbolic link"):
        snapshot_source(_cfg(src, on_bad_image="fail"), tmp_path)
    assert _tree(tmp_path / "data/raw") == before


def test_a_source_that_holds_the_snapshot_or_lies_inside_it_is_refused(tmp_path):
    _folder(tmp_path / "src", n=4)
    snapshot_source(_cfg(tmp_path / "src"), tmp_path)
    before = _tree(tmp_path / "data/raw")
    for source in (
        tmp_path,
        tmp_path / "data",
        tmp_path / "data/raw",
        tmp_path / "data/raw/shards",
    ):
        with pytest.raises(DataError, match="the snapshot folder data/raw"):
            snapshot_source(_cfg(source), tmp_path)
    assert _tree(tmp_path / "data/raw") == before


def test_the_manifest_records_the_source_the_snapshot_came_from(tmp_path):
    from vae_pipeline.data.preparation import prepare

    src = _folder(tmp_path / "src", n=30)
    params_source = _cfg("fashion-mnist", test_fraction=0.3)  # what params.yaml says
    snapshot_source(_cfg(src, test_fraction=0.3), tmp_path)  # an `ingest --source src`
    manifest = prepare(params_source, tmp_path)
    assert manifest["source"] == str(src.resolve())


def test_an_empty_split_says_which_fraction_to_change(tmp_path):
    from vae_pipeline.data.preparation import prepare

    src = _folder(tmp_path / "src", n=6)
    snapshot_source(_cfg(src), tmp_path)
    with pytest.raises(DataError, match=r"split 'train' is empty .*lower data.test_fraction"):
        prepare(_cfg(src, test_fraction=0.98, val_fraction=0.01), tmp_path)
    with pytest.raises(DataError, match=r"split 'test' is empty .*raise data.test_fraction"):
        prepare(_cfg(src, test_fraction=0.0), tmp_path)


def test_max_image_pixels_is_the_one_size_rule(tmp_path, monkeypatch):
    src = _folder(tmp_path / "src", n=4)  # 12x10 = 120 pixels each
    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(src / "dogs" / "big.png")  # 2,000
    # Pillow's own limit, set below these images, is not consulted: the setting decides
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    report = snapshot_source(_cfg(src), tmp_path)
    assert report.images == 5 and report.skipped == [] and report.max_image_pixels == 89478485
    monkeypatch.undo()
    # lowering the limit re-checks files carried over unchanged from the last snapshot
    report = snapshot_source(_cfg(src, max_image_pixels=1000), tmp_path)
    assert [s["path"] for s in report.skipped] == ["dogs/big.png"]
    assert "over data.max_image_pixels (1,000)" in report.skipped[0]["reason"]
    assert (report.images, report.reused, report.fetched) == (4, 4, 0)
    assert "dogs/big.png" not in snapshot_images(tmp_path / "data/raw")
    # raising it again brings the image back (fetched anew: it is not in the snapshot)
    report = snapshot_source(_cfg(src), tmp_path)
    assert (report.images, report.fetched) == (5, 1)


def test_a_file_name_that_is_not_utf8_is_refused_before_anything_is_written(tmp_path):
    src = _folder(tmp_path / "src", n=4)
    bad = os.fsdecode(bytes(src / "dogs") + b"/caf\xe9.png")  # Latin-1 bytes, not UTF-8
    Path(bad).write_bytes(_png(7))
    with pytest.raises(DataError, match=r"caf\\xe9.png: file name is not valid UTF-8"):
        snapshot_source(_cfg(src, on_bad_image="fail"), tmp_path)
    assert not (tmp_path / "data/raw").exists()  # nothing written
    report = snapshot_source(_cfg(src), tmp_path)  # skip: left out, and said so
    assert report.images == 4 and report.skipped[0]["path"] == "dogs/caf\\xe9.png"
    json.loads(report_path(_cfg(src), tmp_path).read_text())  # the report is valid JSON


def test_a_tar_member_whose_name_is_not_utf8_is_refused(tmp_path):
    archive = tmp_path / "photos.tar"
    with tarfile.open(archive, "w", encoding="utf-8", errors="surrogateescape") as tf:
        for name in ("ok.png", os.fsdecode(b"caf\xe9.png")):
            data = _png(3)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    report = snapshot_source(_cfg(archive), tmp_path)
    assert report.images == 1
    assert [s["reason"] for s in report.skipped] == [
        "unsafe archive entry: file name is not valid UTF-8: rename it"
    ]
    json.loads(report_path(_cfg(archive), tmp_path).read_text())  # valid JSON
