"""Lineage as a new team member meets it: a version trained by the retrain flow with `--set`
overrides, rebuilt bit for bit in a second clone from what `vae-pipeline lineage` prints, with
one shared MLflow store and one shared DVC remote, and nothing committed after the training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vae_pipeline.config import build_config, load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.lineage import version_lineage

from .conftest import copy_project_files, make_workspace, tiny_params

pytestmark = pytest.mark.slow

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(command: str, cwd: Path) -> str:
    result = subprocess.run(
        command, shell=True, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{command}: {result.stderr}{result.stdout}"
    return result.stdout


def test_a_version_is_rebuilt_bit_for_bit_in_a_second_clone_from_its_lineage(tmp_path):
    from flows.retrain import retrain
    from vae_pipeline.tracking import client_for, download_weights

    shared = tmp_path / "shared"  # what a team shares: the MLflow store and the DVC remote
    shared.mkdir()
    first = make_workspace(
        tmp_path / "first", registry={"tracking_uri": f"sqlite:///{shared}/mlflow.db"}
    )
    copy_project_files(first, "dvc.yaml", "vae_pipeline", ".gitignore")
    _run(f"{sys.executable} -m dvc init -q", first)
    _run(f"{sys.executable} -m dvc remote add -d local {shared}/dvc-storage", first)
    _run("git add -A && git commit -qm 'the project'", first)
    head = _run("git rev-parse HEAD", first).strip()

    overrides = ["data.limit=384", "train.epochs=1", "train.lr=0.002"]
    summary = retrain(workdir=str(first), overrides=overrides)
    version = summary["model_version"]
    assert _run("git status --porcelain --untracked-files=no", first) == ""  # nothing committed

    cfg = load_config(first / "params.yaml")
    uri = tracking_uri(cfg, first)
    client = client_for(uri)
    info = version_lineage(client, "conv-vae", version)
    tags = info["tags"]
    assert tags["git_commit"] == head and tags["data_remote"] == f"local {shared}/dvc-storage"
    assert tags["lineage_data"] == "recorded"
    commands = info["reproduce"]
    assert commands[0] == f"git checkout {head}"
    assert commands[1].startswith(f"vae-pipeline lineage {version} --restore")
    assert commands[2].startswith("dvc pull -r local data/raw.dvc")
    assert commands[3].startswith("dvc repro") and not any("NOTE" in c for c in commands)

    second = tmp_path / "second"
    _run(f"git clone -q {first} {second}", tmp_path)
    assert not (second / "data").exists()  # no pointer, no data: all from the lineage
    for command in commands:
        _run(command, second)

    restored = yaml.safe_load((second / "params.yaml").read_text())
    assert (restored["data"]["limit"], restored["train"]["epochs"]) == (384, 1)
    assert build_config(restored).params_hash() == tags["params_hash"]
    rebuilt = torch.load(second / "models/model.pt", weights_only=True)
    registered = torch.load(download_weights(uri, f"models:/conv-vae/{version}"), weights_only=True)
    assert rebuilt["state_dict"].keys() == registered["state_dict"].keys()
    for key, tensor in registered["state_dict"].items():
        assert torch.equal(rebuilt["state_dict"][key], tensor), key
    assert registered["git_commit"] == head  # model.pt carries its commit too

    # MLflow shows what the run was trained and tested on: its splits as dataset inputs.
    inputs = client.get_run(info["run_id"]).inputs.dataset_inputs
    contexts = {i.tags[0].value: i.dataset for i in inputs}
    assert set(contexts) == {"train", "val", "test"}
    version_id = tags["data_version"]
    for dataset in contexts.values():
        assert dataset.digest == version_id
        assert f"{shared}/dvc-storage/files/md5/{version_id[:2]}/{version_id[2:]}.dir" in (
            dataset.source
        )

    metrics = json.loads((second / "reports/metrics.json").read_text())
    assert metrics["data_version"] == tags["data_version"]
    assert repr(float(metrics["iw_nll"])) == tags["iw_nll"]


def test_a_per_clone_remote_is_named_as_such(tmp_path):
    """The default local remote is a folder of the clone: lineage and ingest say others cannot
    pull from it."""
    from vae_pipeline.lineage import remote_info, unshared_note
    from vae_pipeline.versioning import ensure_repo

    ws = make_workspace(tmp_path / "ws")
    ensure_repo(ws)
    cfg = build_config(tiny_params())
    remote = remote_info(cfg, ws)
    assert remote == {
        "name": "local",
        "url": str((ws / ".dvc-storage").resolve()),
        "endpoint": "",
        "shared": False,
    }
    assert "a folder inside this clone" in unshared_note(remote)
    _run(f"{sys.executable} -m dvc remote modify local url {tmp_path / 'team'}", ws)
    assert remote_info(cfg, ws)["shared"]


def test_prepare_without_raw_data_names_pull_and_ingest(tmp_path):
    from vae_pipeline.data.errors import DataError
    from vae_pipeline.data.preparation import prepare

    cfg = build_config(tiny_params())
    with pytest.raises(DataError, match=r"vae-pipeline ingest.*lineage VERSION --restore"):
        prepare(cfg, tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/raw.dvc").write_text("outs: []\n")
    with pytest.raises(DataError, match=r"`dvc pull data/raw.dvc` fetches the data version"):
        prepare(cfg, tmp_path)


def test_dvc_plots_output_is_git_ignored(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    copy_project_files(ws, ".gitignore")
    (ws / "dvc_plots").mkdir()
    (ws / "dvc_plots/index.html").write_text("<html></html>")
    assert _run("git check-ignore dvc_plots/index.html", ws).strip() == "dvc_plots/index.html"
