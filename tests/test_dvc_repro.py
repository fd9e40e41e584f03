"""dvc.yaml: `vae-pipeline ingest` then `dvc repro` runs prepare -> train -> evaluate via the CLI."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import copy_project_files

pytestmark = pytest.mark.slow


def test_dvc_repro_reproduces_the_chain(workspace):
    copy_project_files(workspace, "dvc.yaml", "vae_pipeline")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}

    def run(*cmd):
        return subprocess.run(
            cmd, cwd=workspace, env=env, capture_output=True, text=True, timeout=600
        )

    ingest = run(sys.executable, "-m", "vae_pipeline.cli", "ingest")
    assert ingest.returncode == 0, ingest.stderr
    data_version = ingest.stdout.strip().splitlines()[-1]
    repro = run(sys.executable, "-m", "dvc", "repro")
    assert repro.returncode == 0, repro.stderr + repro.stdout
    lock = yaml.safe_load((workspace / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"prepare", "train", "evaluate"}
    metrics = json.loads((workspace / "reports/metrics.json").read_text())
    assert metrics["data_version"] == data_version
    assert metrics["iw_nll"] > 0
    status = run(sys.executable, "-m", "dvc", "status")
    assert "up to date" in status.stdout.lower()
