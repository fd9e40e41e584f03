"""torchrun's ranks run on GPU hosts that have torch but not MLflow, Prefect, DVC or boto3:
`vae_pipeline.worker` (training) and `vae_pipeline.eval_worker` (evaluation) import none of
them, and each runs for real with those packages made unimportable, giving the numbers of the
in-process code. An MLflow URI is downloaded by the launching process, never by the ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vae_pipeline import pipeline, tracking
from vae_pipeline.config import build_config
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.evaluate.model_file import evaluate_model_file
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.checkpoint import load_model, save_model
from vae_pipeline.train.trainer import Trainer

from .conftest import REPO, make_workspace, tiny_params

TRACKING_PACKAGES = ("mlflow", "prefect", "dvc", "boto3", "botocore")

# Imported by a rank at start and on its way (the evaluation's function and what it imports
# when it runs: the uses and the pictures).
RANK_MODULES = (
    "vae_pipeline.worker",
    "vae_pipeline.eval_worker",
    "vae_pipeline.evaluate.model_file",
    "vae_pipeline.evaluate.downstream",
    "vae_pipeline.evaluate.pictures",
    "vae_pipeline.train.trainer",
)

# A sitecustomize on PYTHONPATH: every Python process of the command, torchrun's ranks
# included, finds these packages missing, as on a host where they are not installed.
BLOCKER = f"""
import sys

BLOCKED = {TRACKING_PACKAGES!r}


class NotInstalled:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked)", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


def loaded_tracking_packages(modules: tuple[str, ...]) -> list[str]:
    """The tracking packages in sys.modules of a fresh interpreter that imported `modules`."""
    code = textwrap.dedent(
        f"""
        import importlib, json, sys
        for name in {list(modules)!r}:
            importlib.import_module(name)
        from vae_pipeline.evaluate.model_file import evaluate_model_file  # the eval path
        print(json.dumps(sorted({{m.split(".")[0] for m in sys.modules}} & {set(TRACKING_PACKAGES)!r})))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_rank_modules_import_no_tracking_package():
    assert loaded_tracking_packages(RANK_MODULES) == []


def test_the_import_check_sees_a_tracking_package():
    """Not vacuous: the pipeline (which does use MLflow) is seen importing it."""
    assert "mlflow" in loaded_tracking_packages(("vae_pipeline.pipeline",))


def blocked_run(args: list[str], cwd: Path, blocker_dir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker_dir), str(REPO)])}
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def blocker(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("blocker")
    (folder / "sitecustomize.py").write_text(BLOCKER)
    return folder


def test_the_blocker_blocks(blocker, tmp_path):
    result = blocked_run(["-c", "import mlflow"], tmp_path, blocker)
    assert result.returncode == 1 and "No module named 'mlflow' (blocked)" in result.stderr
    assert blocked_run(["-c", "import torch, numpy, yaml, PIL"], tmp_path, blocker).returncode == 0


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared workspace (its params.yaml: the tiny values, one rank)."""
    ws = make_workspace(tmp_path_factory.mktemp("gpu-host") / "ws", train={"nproc_per_node": 1})
    cfg = build_config(tiny_params(train={"nproc_per_node": 1}))
    snapshot_source(cfg, ws)
    pipeline.prepare_data(cfg, ws)
    return ws, cfg


def test_a_training_rank_runs_without_the_tracking_packages(prepared, blocker):
    """`python -m vae_pipeline.worker` without --mlflow-run-id, the packages unimportable:
    the same weights, bit for bit, as the trainer in this process."""
    ws, cfg = prepared
    result = blocked_run(
        ["-m", "vae_pipeline.worker", "--params", "params.yaml", "--out-dir", "blocked"],
        ws,
        blocker,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    Trainer(cfg, ws / "here", workdir=ws).fit()
    blocked, _ = load_model(ws / "blocked" / "model.pt")
    here, _ = load_model(ws / "here" / "model.pt")
    for (name, a), (_, b) in zip(
        blocked.state_dict().items(), here.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_an_evaluation_rank_runs_without_the_tracking_packages(prepared, blocker):
    """`python -m vae_pipeline.eval_worker`, the packages unimportable: the metrics of the
    evaluation in this process, equal; given an MLflow URI, one line saying what to do."""
    ws, cfg = prepared
    torch.manual_seed(0)
    save_model(ConvVAE(1, 32, cfg.model.latent_dim).eval(), ws / "eval-model.pt")
    here = evaluate_model_file(cfg, "eval-model.pt", ws)
    result = blocked_run(
        [
            "-m",
            "vae_pipeline.eval_worker",
            "--params",
            "params.yaml",
            "--model",
            "eval-model.pt",
            "--set",
            "evaluate.reports_dir=reports-blocked",
        ],  # fmt: skip
        ws,
        blocker,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    blocked = json.loads((ws / "reports-blocked" / "metrics.json").read_text())
    assert set(blocked) == set(here)
    for key, value in here.items():
        if not key.endswith("_seconds"):
            assert blocked[key] == value, key

    uri = "models:/conv-vae@champion"
    refused = blocked_run(
        ["-m", "vae_pipeline.eval_worker", "--params", "params.yaml", "--model", uri], ws, blocker
    )
    assert refused.returncode == 1
    assert f"--model {uri}: an MLflow URI needs MLflow on every rank" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_sharded_evaluation_hands_the_ranks_a_downloaded_file(prepared, monkeypatch):
    """With evaluate.nproc_per_node > 1, a models:/ URI is downloaded by the launcher and
    torchrun's ranks get the local file; a wrong holdout class fails before any rank starts,
    naming the URI."""
    ws, cfg = prepared
    torch.manual_seed(0)
    save_model(ConvVAE(1, 32, cfg.model.latent_dim).eval(), ws / "downloaded" / "model.pt")
    downloads, launches = [], []

    def download_weights(uri: str, model_uri: str) -> Path:
        downloads.append(model_uri)
        return ws / "downloaded" / "model.pt"

    def launch_evaluation(cfg, model_ref: str, workdir: Path) -> None:
        launches.append(model_ref)
        (workdir / cfg.evaluate.reports_dir).mkdir(exist_ok=True)
        (workdir / cfg.evaluate.reports_dir / "metrics.json").write_text('{"elbo": -1.0}')

    monkeypatch.setattr(tracking, "download_weights", download_weights)
    monkeypatch.setattr(pipeline, "launch_evaluation", launch_evaluation)
    sharded = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"nproc_per_node": 2})}
    )
    uri = "models:/conv-vae@champion"
    assert pipeline.evaluate_model(sharded, uri, ws) == {"elbo": -1.0}
    assert downloads == [uri] and launches == [str(ws / "downloaded" / "model.pt")]
    assert pipeline.evaluate_model(sharded, "downloaded", ws) == {"elbo": -1.0}
    assert launches[-1] == "downloaded"  # a local ref goes as it is (its history.json too)

    other = sharded.model_copy(
        update={"anomaly": sharded.anomaly.model_copy(update={"holdout_class": "Bag"})}
    )
    with pytest.raises(ValueError, match=f"{uri} was trained without class None"):
        pipeline.evaluate_model(other, uri, ws)
    assert len(launches) == 2
