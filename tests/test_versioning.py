"""DVC data versions against a real DVC repo: the local remote, and S3 through moto's server on
127.0.0.1 (real S3 HTTP, spoken to by boto3 and by DVC's S3 remote)."""

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from vae_pipeline import versioning
from vae_pipeline.config import build_config
from vae_pipeline.data.sources import snapshot_source

from .conftest import tiny_params
from .s3_helpers import CuttableProxy, MotoServer


def _cfg(**data):
    params = tiny_params()
    params["data"].update(data)
    return build_config(params)


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_same_content_same_version_and_nothing_new_stored(workspace):
    cfg = _cfg()
    snapshot_source(cfg, workspace)
    first = versioning.version_data(cfg, workspace)
    stored = _files(workspace / ".dvc-storage")
    assert len(first) == 32 and versioning.read_data_version(cfg, workspace) == first
    assert len(stored) == 5  # 4 IDX files + the directory listing
    snapshot_source(cfg, workspace)
    assert versioning.version_data(cfg, workspace) == first
    assert _files(workspace / ".dvc-storage") == stored


def test_changed_content_gets_a_new_version_and_the_old_one_stays(workspace, tmp_path):
    cfg = _cfg()
    snapshot_source(cfg, workspace)
    first = versioning.version_data(cfg, workspace)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "a.png")
    cfg2 = _cfg(source=str(folder))
    snapshot_source(cfg2, workspace)
    second = versioning.version_data(cfg2, workspace)
    assert second != first
    # both versions' directory listings are in the remote: the old version is not lost
    for version in (first, second):
        listing = workspace / ".dvc-storage/files/md5" / version[:2] / (version[2:] + ".dir")
        assert listing.is_file()


@pytest.fixture
def s3_server(monkeypatch):
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket="vae-data")
    yield s3, endpoint
    server.stop()


@pytest.mark.slow
def test_s3_remote_push_and_pull_through_moto(workspace, s3_server):
    s3, endpoint = s3_server
    cfg = _cfg(remote="s3", s3_url="s3://vae-data/dvc")
    snapshot_source(cfg, workspace)
    version = versioning.version_data(cfg, workspace)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="vae-data")["Contents"]]
    assert len(keys) == 5 and all(k.startswith("dvc/files/md5/") for k in keys)
    assert any(k.endswith(version[2:] + ".dir") for k in keys)
    # endpoint in the git-ignored local config; credentials nowhere on disk
    local_config = (workspace / ".dvc/config.local").read_text()
    assert endpoint in local_config
    for path in (workspace / ".dvc").rglob("config*"):
        assert "testing-secret" not in path.read_text()
    # drop the workspace copy and the cache, pull back from S3: the same bytes
    raw = workspace / "data/raw"
    before = {p: (raw / p).read_bytes() for p in _files(raw)}
    shutil.rmtree(raw)
    shutil.rmtree(workspace / ".dvc/cache")
    result = subprocess.run(
        [sys.executable, "-m", "dvc", "pull", "-r", "s3"],
        cwd=workspace,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert result.returncode == 0, result.stderr
    assert {p: (raw / p).read_bytes() for p in _files(raw)} == before


def _png_folder(root, n, start=0):
    rng = np.random.default_rng(start)
    for i in range(start, start + n):
        (root / f"c{i % 3}").mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(8, 8), dtype=np.uint8)
        Image.fromarray(arr).save(root / f"c{i % 3}" / f"{i:05d}.png")
    return root


@pytest.mark.parametrize("layout", ["shards", "files"])
def test_adding_images_uploads_only_the_new_ones(workspace, tmp_path, layout):
    src = _png_folder(tmp_path / "imgs", 300)
    cfg = _cfg(source=str(src), layout=layout)
    snapshot_source(cfg, workspace)
    first = versioning.version_data(cfg, workspace)
    storage = workspace / ".dvc-storage"
    stored = set(_files(storage))
    # shards: one shard, its manifest and the directory listing; files: one object per image
    assert len(stored) == (3 if layout == "shards" else 301)
    _png_folder(src, 10, start=300)
    report = snapshot_source(cfg, workspace)
    assert (report.fetched, report.reused) == (10, 300)
    second = versioning.version_data(cfg, workspace)
    added = set(_files(storage)) - stored
    # shards: a new shard of the 10 images, its manifest, the new listing
    assert second != first and len(added) == (3 if layout == "shards" else 11)
    if layout == "shards":  # about the 10 images' bytes (the per-file listing alone is more)
        added_bytes = sum((storage / p).stat().st_size for p in added)
        assert added_bytes < 0.1 * sum((storage / p).stat().st_size for p in stored)


def test_a_second_clone_pulls_the_shards_and_prepares_the_same_data(workspace, tmp_path):
    """Pull where it is used: a clone gets the version's shards (a few objects, not one per
    image), and prepares from them exactly what the first workspace prepared."""
    from vae_pipeline.data.preparation import prepare

    from .data.conftest import file_tree, snapshot_images

    src = _png_folder(tmp_path / "imgs", 120)
    cfg = _cfg(source=str(src), shard_bytes=65536, limit=None, test_fraction=0.2)
    snapshot_source(cfg, workspace)
    version = versioning.version_data(cfg, workspace)
    subprocess.run(["git", "add", "-A"], cwd=workspace, check=True)
    subprocess.run(["git", "commit", "-qm", "data"], cwd=workspace, check=True)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(workspace), str(clone)], check=True)
    storage = str((workspace / ".dvc-storage").resolve())
    versioning.dvc(["remote", "add", "--local", "-f", "local", storage], clone)
    pulled = versioning.dvc(["pull", "data/raw.dvc"], clone).stdout
    objects = len(_files(workspace / ".dvc-storage"))
    assert 3 < objects < 15 and f"{objects - 1} files added" in pulled  # shards + manifests
    assert versioning.read_data_version(cfg, clone) == version
    assert snapshot_images(clone / "data/raw") == file_tree(src)
    for ws in (workspace, clone):
        prepare(cfg, ws, data_version=version)
    assert file_tree(clone / "data/prepared") == file_tree(workspace / "data/prepared")


@pytest.fixture
def flaky_s3(monkeypatch):
    """moto's S3 server behind a proxy that the test can cut; DVC talks to the proxy."""
    server = MotoServer()
    proxy = CuttableProxy(server.port)
    for key, value in server.env(proxy.endpoint).items():
        monkeypatch.setenv(key, value)
    server.client().create_bucket(Bucket="vae-data")
    yield server, proxy
    proxy.close()
    server.stop()


def _keys(server):
    listing = server.client().list_objects_v2(Bucket="vae-data").get("Contents", [])
    return {o["Key"] for o in listing}


@pytest.mark.slow
def test_failed_push_records_no_version_and_keeps_the_previous_one(workspace, tmp_path, flaky_s3):
    server, proxy = flaky_s3
    src = _png_folder(tmp_path / "imgs", 20)
    cfg = _cfg(source=str(src), remote="s3", s3_url="s3://vae-data/dvc", push_attempts=1)
    snapshot_source(cfg, workspace)
    first = versioning.version_data(cfg, workspace)
    pointer = (workspace / "data/raw.dvc").read_text()
    raw_before = {
        p: (workspace / "data/raw" / p).read_bytes() for p in _files(workspace / "data/raw")
    }
    _png_folder(src, 5, start=20)
    snapshot_source(cfg, workspace)
    proxy.cut()  # the remote goes away for good
    with pytest.raises(versioning.VersioningError, match=rf"was not recorded.*still {first}"):
        versioning.version_data(cfg, workspace)
    assert (workspace / "data/raw.dvc").read_text() == pointer
    assert versioning.read_data_version(cfg, workspace) == first
    raw = workspace / "data/raw"
    assert {p: (raw / p).read_bytes() for p in _files(raw)} == raw_before
    _assert_complete_in_remote(server, first)  # the recorded version's objects are all there
    # the remote comes back: the next ingest records the new version
    proxy.restore()
    snapshot_source(cfg, workspace)
    second = versioning.version_data(cfg, workspace)
    assert second != first and f"dvc/files/md5/{second[:2]}/{second[2:]}.dir" in _keys(server)


def _assert_complete_in_remote(server, version):
    keys = _keys(server)
    listing = (
        server.client()
        .get_object(Bucket="vae-data", Key=f"dvc/files/md5/{version[:2]}/{version[2:]}.dir")["Body"]
        .read()
    )
    for entry in json.loads(listing):
        assert f"dvc/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}" in keys


@pytest.mark.slow
def test_remote_cut_mid_push_then_back_ends_complete(workspace, tmp_path, flaky_s3):
    server, proxy = flaky_s3
    src = _png_folder(tmp_path / "imgs", 120)
    cfg = _cfg(source=str(src), remote="s3", s3_url="s3://vae-data/dvc", push_attempts=3)
    snapshot_source(cfg, workspace)
    start = proxy.bytes_up
    cuts = []

    def cut_mid_push():
        while proxy.bytes_up - start < 20_000:  # some objects are up, not all (about 60 KB)
            time.sleep(0.005)
        proxy.cut()
        cuts.append(proxy.bytes_up - start)
        time.sleep(1.0)
        proxy.restore()

    cutter = threading.Thread(target=cut_mid_push, daemon=True)
    cutter.start()
    try:
        version = versioning.version_data(cfg, workspace)
    except versioning.VersioningError as exc:  # also allowed: a clear error, nothing recorded
        assert "was not recorded" in str(exc)
        assert versioning.read_data_version(cfg, workspace) is None
    else:
        assert versioning.read_data_version(cfg, workspace) == version
        _assert_complete_in_remote(server, version)
    cutter.join(30)
    assert cuts and cuts[0] < proxy.bytes_up - start  # cut mid-push: more was sent afterwards


@pytest.mark.parametrize("when", ["before it wrote the pointer", "after it wrote the pointer"])
def test_dvc_add_failing_part_way_leaves_the_previous_version_intact(
    workspace, tmp_path, monkeypatch, when
):
    cfg = _cfg()
    snapshot_source(cfg, workspace)
    first = versioning.version_data(cfg, workspace)
    pointer = versioning.pointer_file(cfg, workspace)
    recorded = pointer.read_bytes()
    raw_files = {
        p: (workspace / "data/raw" / p).read_bytes() for p in _files(workspace / "data/raw")
    }

    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.full((8, 8), 7, np.uint8)).save(folder / "a.png")
    cfg2 = _cfg(source=str(folder))
    snapshot_source(cfg2, workspace)  # the raw area now holds the new snapshot
    real = versioning.dvc

    def dvc_killed(args, workdir, check=True):
        if args[0] == "add":
            if when.startswith("after"):
                real(args, workdir, check)  # the new pointer is written, then the process dies
            raise KeyboardInterrupt("dvc add stopped part-way")
        return real(args, workdir, check)

    monkeypatch.setattr(versioning, "dvc", dvc_killed)
    with pytest.raises(KeyboardInterrupt):
        versioning.version_data(cfg2, workspace)
    monkeypatch.undo()
    # pointer and raw area agree, on the previous version
    assert (
        pointer.read_bytes() == recorded and versioning.read_data_version(cfg, workspace) == first
    )
    got = {p: (workspace / "data/raw" / p).read_bytes() for p in _files(workspace / "data/raw")}
    assert got == raw_files
    status = versioning.dvc(["status", "--json", str(pointer.relative_to(workspace))], workspace)
    assert json.loads(status.stdout or "{}") == {}  # DVC agrees: nothing changed
