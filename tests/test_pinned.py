"""The champion's pinned test data, rebuilt from DVC when the workspace holds another data
version (a real git + DVC repo, a real SQLite MLflow store; no training)."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from vae_pipeline.config import load_config
from vae_pipeline.pipeline import ingest, prepare_data
from vae_pipeline.registry.pinned import PINNED_PREFIX, pinned_config
from vae_pipeline.tracking import client_for

from .conftest import fashion_mnist_pngs, make_workspace
from .registry_helpers import add_version, evidence


@pytest.fixture
def two_versions(tmp_path):
    """A workspace whose data moved from version A (300 images) to B (another 300)."""
    ws = make_workspace(tmp_path / "ws", data={"source": "first", "limit": None})
    fashion_mnist_pngs(ws / "first", 0, 300)
    fashion_mnist_pngs(ws / "second", 5000, 300)
    cfg = load_config(ws / "params.yaml")
    a = ingest(cfg, ws)
    prepare_data(cfg, ws)
    test_a = np.load(ws / "data/prepared/test_images.npy")
    cfg_b = load_config(ws / "params.yaml", ["data.source=second"])
    b = ingest(cfg_b, ws)
    prepare_data(cfg_b, ws)
    return ws, cfg, a, b, test_a


def test_the_champions_test_split_is_rebuilt_from_dvc(two_versions):
    ws, cfg, a, b, test_a = two_versions
    assert a != b
    client = client_for(f"sqlite:///{ws}/mlflow.db")
    mv = client.get_model_version("conv-vae", add_version(client, evidence(1)))
    client.set_model_version_tag("conv-vae", mv.version, "test_data_version", a)
    mv = client.get_model_version("conv-vae", mv.version)

    pinned = pinned_config(cfg, client, mv, ws)
    assert pinned.data.prepared_dir == f"{PINNED_PREFIX}{a}/prepared"
    rebuilt = np.load(ws / pinned.data.prepared_dir / "test_images.npy")
    assert np.array_equal(rebuilt, test_a)  # the very images the champion was tested on
    assert not list(ws.glob(".vae-pinned-*"))  # the transient DVC pointer is gone
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=ws, capture_output=True, text=True
    )
    assert PINNED_PREFIX not in status.stdout  # ignored by git, like data/prepared
    # the workspace's own data is untouched, and a second call reuses the rebuilt split
    assert np.load(ws / "data/prepared/test_images.npy").shape[0] > 0
    assert pinned_config(cfg, client, mv, ws).data.prepared_dir == pinned.data.prepared_dir

    client.set_model_version_tag("conv-vae", mv.version, "test_data_version", b)
    same = client.get_model_version("conv-vae", mv.version)
    assert pinned_config(cfg, client, same, ws) is None  # the workspace holds it already
