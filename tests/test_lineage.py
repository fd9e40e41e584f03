"""Lineage as a new team member meets it: a version trained by the retrain flow with `--set`
overrides, rebuilt bit for bit in a second clone on the same machine by running, as printed,
the commands `vae-pipeline lineage` gives, under the defaults (the first clone's own SQLite
store and DVC remote folder), with nothing committed after the training."""

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

ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _run(command: str, cwd: Path) -> str:
    result = subprocess.run(
        command, shell=True, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, f"{command}: {result.stderr}{result.stdout}"
    return result.stdout


@pytest.mark.slow
def test_a_version_is_rebuilt_bit_for_bit_in_a_second_clone_from_its_lineage(tmp_path):
    from flows.retrain import retrain
    from vae_pipeline.tracking import client_for, download_weights

    first = make_workspace(tmp_path / "first")  # the defaults: the store and remote are its own
    copy_project_files(first, "dvc.yaml", "vae_pipeline", ".gitignore", ".dvc", ".dvcignore")
    _run("git add -A && git commit -qm 'the project'", first)
    head = _run("git rev-parse HEAD", first).strip()

    overrides = ["data.limit=384", "train.epochs=1", "train.lr=0.002"]
    summary = retrain(workdir=str(first), overrides=overrides)
    version = summary["model_version"]
    assert _run("git status --porcelain --untracked-files=no", first) == ""  # nothing committed

    cfg = load_config(first / "params.yaml")
    uri = tracking_uri(cfg, first)
    assert uri == f"sqlite:///{(first / 'mlflow.db').resolve()}"  # the default store
    client = client_for(uri)
    info = version_lineage(client, "conv-vae", version)
    tags = info["tags"]
    storage = (first / ".dvc-storage").resolve()
    assert tags["git_commit"] == head and tags["data_remote"] == f"local {storage}"
    assert tags["lineage_data"] == "recorded"
    commands = info["reproduce"]
    print("\n".join(commands))
    assert commands[0] == f"git checkout {head}"
    restore = f"vae-pipeline lineage {version} --restore --set registry.tracking_uri={uri}"
    assert [c for c in commands if not c.startswith("#")][1:] == [
        f"{restore}   # params.yaml and data/raw.dvc as run {info['run_id']} had them "
        "(overrides included)",
        f"dvc remote add --local -f lineage {storage}",
        f"dvc pull -r lineage data/raw.dvc   # data version {tags['data_version']} from {storage}",
        "dvc repro           # prepare -> train -> evaluate: the same weights on the same "
        "device kind",
    ]

    second = tmp_path / "second"
    _run(f"git clone -q {first} {second}", tmp_path)
    assert not (second / "data").exists()  # no pointer, no data: all from the lineage
    for command in commands:  # as printed (comments included), one shell line each
        _run(command, second)
    assert not (second / ".dvc-storage").exists()  # its own remote untouched: pulled from first

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
        assert f"{storage}/files/md5/{version_id[:2]}/{version_id[2:]}.dir" in dataset.source

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


def test_commands_name_a_local_store_and_remote_by_path_and_a_shared_one_by_name():
    from vae_pipeline.lineage import reproduce_commands

    tags = {"git_commit": "0123abcd", "data_version": "feedbeef"}
    pointer = {"pointer": "data/raw.dvc"}
    team = {"name": "local", "url": "/srv/team/dvc", "endpoint": "", "shared": True, **pointer}
    server = reproduce_commands("3", "r1", tags, team, True, "http://mlflow.example:5000")
    assert [c for c in server if not c.startswith("#")] == [
        "git checkout 0123abcd",
        "vae-pipeline lineage 3 --restore   # params.yaml and data/raw.dvc as run r1 had them "
        "(overrides included)",
        "dvc pull -r local data/raw.dvc   # data version feedbeef from /srv/team/dvc",
        "dvc repro           # prepare -> train -> evaluate: the same weights on the same "
        "device kind",
    ]
    # a relative SQLite store is named by its absolute path (the clone's own folder is another)
    relative = reproduce_commands("3", "r1", tags, team, True, "sqlite:///stores/m.db")
    absolute = f"sqlite:///{Path('stores/m.db').resolve()}"
    assert f"--restore --set registry.tracking_uri={absolute}   #" in relative[2]
    assert "a file on this machine" in relative[1] and "shared tracking server" in relative[1]
    assert "--set" not in reproduce_commands("3", "r1", tags, team, True, "databricks")[1]
    s3 = {"name": "s3", "url": "s3://b/p", "endpoint": "http://127.0.0.1:9", "shared": True}
    lines = reproduce_commands("3", "r1", tags, {**s3, **pointer}, True, "https://m.example")
    assert lines[2:5] == [
        "dvc remote add --local -f s3 s3://b/p",
        "dvc remote modify --local s3 endpointurl http://127.0.0.1:9",
        "dvc pull -r s3 data/raw.dvc   # data version feedbeef from s3://b/p",
    ]


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
