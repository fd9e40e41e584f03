"""dvc.yaml: `vae-pipeline ingest` then `dvc repro` runs prepare -> train -> evaluate via the CLI;
a fresh clone pulls, reproduces nothing, and runs and lists an experiment."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import copy_project_files

pytestmark = pytest.mark.slow


def test_fresh_clone_pulls_reproduces_and_runs_an_experiment(workspace, tmp_path):
    """A teammate's view: clone, `dvc pull`, `dvc repro` (nothing to do), `dvc exp run -S`,
    and `dvc exp show` listing the experiment's params and metrics."""
    copy_project_files(workspace, "dvc.yaml", "vae_pipeline")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd, cwd=workspace):
        result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{cmd}: {result.stderr}{result.stdout}"
        return result.stdout

    dvc = (sys.executable, "-m", "dvc")
    data_version = run(sys.executable, "-m", "vae_pipeline.cli", "ingest").strip().splitlines()[-1]
    run(*dvc, "repro")
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train", "evaluate"}
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    assert metrics["data_version"] == data_version and metrics["iw_nll"] > 0
    run(*dvc, "push")  # the pipeline's outputs too, so a clone needs to run nothing
    copy_project_files(workspace, ".gitignore")  # the project's: metrics must stay visible to git
    run("git", "add", "-A")
    run("git", "commit", "-qm", "baseline")

    clone = tmp_path / "clone"
    run("git", "clone", "-q", str(workspace), str(clone))
    run(*dvc, "pull", cwd=clone)
    baseline = json.loads((clone / "reports/metrics.json").read_text())
    assert baseline == json.loads((workspace / "reports/metrics.json").read_text())
    assert "up to date" in run(*dvc, "status", cwd=clone).lower()
    run(*dvc, "repro", cwd=clone)  # nothing changed: nothing runs
    assert json.loads((clone / "reports/metrics.json").read_text()) == baseline

    run(*dvc, "exp", "run", "-n", "slower-lr", "-S", "train.lr=0.0003", cwd=clone)
    rows = json.loads(run(*dvc, "exp", "show", "--json", cwd=clone))
    found = {}
    for commit in rows:
        for exp in [commit, *[e for e in (commit.get("experiments") or []) for e in e["revs"]]]:
            data = exp.get("data") or {}
            params = data.get("params", {}).get("params.yaml", {}).get("data", {})
            metrics = data.get("metrics", {}).get("reports/metrics.json", {}).get("data", {})
            if params and metrics:
                found[exp.get("name") or data.get("rev")] = (
                    params["train"]["lr"],
                    metrics["iw_nll"],
                )
    assert found["slower-lr"][0] == 0.0003
    assert found["slower-lr"][1] != baseline["iw_nll"]  # it really trained again
    assert any(lr != 0.0003 for lr, _ in found.values())  # the baseline row is listed too
