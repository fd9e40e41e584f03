"""A `make run`-sized job, as a user starts it, prints no deprecation warning from the libraries
the project calls: every warning is shown once where it is raised (PYTHONWARNINGS=default,
DeprecationWarning included), in the command's output and in torchrun's log of the ranks."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import make_workspace

pytestmark = pytest.mark.slow

# What a deprecation warning looks like when Python prints it: "<file>:<line>: <Category>: ..."
# (SQLAlchemy's SADeprecationWarning, MLflow's and Prefect's own subclasses end the same way).
DEPRECATION = re.compile(r"\b\w*(FutureWarning|DeprecationWarning): ")


def test_a_retrain_prints_no_deprecation_warning(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env = {
        **os.environ,
        "PYTHONWARNINGS": "default",
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    env.pop("PREFECT_API_URL", None)  # the ephemeral server, as `make run` has it
    result = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "retrain"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "retrain finished: conv-vae v1" in result.stdout
    logs = {"stdout": result.stdout, "stderr": result.stderr}
    logs.update({str(p): p.read_text() for p in (ws / "runs").glob("*/torchrun.log")})
    assert len(logs) == 3  # the ranks' log was read too
    warned = [
        f"{where}: {line}"
        for where, text in logs.items()
        for line in text.splitlines()
        if DEPRECATION.search(line)
    ]
    assert not warned, "\n".join(warned[:20])


def test_the_pattern_sees_each_kind_of_deprecation_line():
    lines = [
        "/x/torch/nn/parallel/distributed.py:961: FutureWarning: `broadcast_buffers` is ...",
        "sys:1: SADeprecationWarning: Type object <class 'prefect...UUID'> does not refer ...",
        "/x/mlflow/a.py:3: DeprecationWarning: the noload loader strategy is deprecated",
    ]
    assert all(DEPRECATION.search(line) for line in lines)
    assert not DEPRECATION.search("[vae-pipeline] 07:12:18 snapshot of fashion-mnist ...")
