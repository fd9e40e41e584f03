"""DVC data versions against a real DVC repo: the local remote, and S3 through moto's server on
127.0.0.1 (real S3 HTTP, spoken to by boto3 and by DVC's S3 remote)."""

import os
import shutil
import subprocess
import sys

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image

from vae_pipeline import versioning
from vae_pipeline.config import build_config
from vae_pipeline.data import snapshot_source

from .conftest import tiny_params


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
