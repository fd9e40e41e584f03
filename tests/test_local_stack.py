"""`make stack-up` / `make stack-down` (infra/local_stack.py): mlflow server, prefect server and
an S3 server on 127.0.0.1, and a retrain pointed at them by the env file, as `make run` is."""

from __future__ import annotations

import subprocess
import sys

import boto3
import pytest
import requests
from mlflow.tracking import MlflowClient

from .conftest import REPO, copy_project_files, make_workspace
from .server_helpers import free_port

pytestmark = pytest.mark.slow

SCRIPT = REPO / "infra" / "local_stack.py"


def _stack(action: str, state, ports=()) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), action, "--dir", str(state), *ports],
        capture_output=True,
        text=True,
        timeout=300,
    )


def _env(state) -> dict[str, str]:
    out = subprocess.run(
        ["bash", "-c", f"set -a; . {state / 'env'}; set +a; env"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def test_the_local_stack_takes_a_retrain_and_stops(tmp_path):
    state = tmp_path / ".stack"
    ports = [f"--{n}-port={free_port()}" for n in ("s3", "mlflow", "prefect")]
    result = _stack("up", state, ports)
    try:
        assert result.returncode == 0, result.stdout + result.stderr
        assert _stack("status", state).returncode == 0
        again = _stack("up", state, ports)
        assert again.returncode == 0 and "already up" in again.stdout
        env = _env(state)
        assert requests.get(env["PREFECT_API_URL"] + "/health", timeout=5).ok

        ws = make_workspace(tmp_path / "ws")
        copy_project_files(ws, "flows")
        # What `make run` does with the stack's env file (see the Makefile's run target).
        run = subprocess.run(
            ["bash", "-c", f"set -a; . {state / 'env'}; set +a; "
             f"{sys.executable} -m vae_pipeline.cli retrain $VAE_PIPELINE_STACK_ARGS"],
            cwd=ws, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        assert "retrain finished: conv-vae v1" in run.stdout

        client = MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        champion = client.get_model_version_by_alias("conv-vae", "champion")
        assert str(champion.version) == "1"
        assert not (ws / "mlflow.db").exists()  # registered on the server, not locally
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        )
        keys = [
            obj["Key"]
            for page in s3.get_paginator("list_objects_v2").paginate(Bucket="vae-pipeline")
            for obj in page.get("Contents", [])
        ]
        data_version = champion.tags["data_version"]
        assert f"dvc/files/md5/{data_version[:2]}/{data_version[2:]}.dir" in keys
        assert any(k.startswith("mlflow/") and k.endswith("model.pt") for k in keys)
        # The flow ran against the stack's Prefect server, not an ephemeral one.
        flow_run = requests.get(
            f"{env['PREFECT_API_URL']}/flow_runs/{champion.tags['flow_run_id']}", timeout=10
        )
        assert flow_run.ok and flow_run.json()["state"]["type"] == "COMPLETED"
    finally:
        down = _stack("down", state)
    assert down.returncode == 0 and "stack down" in down.stdout
    assert f"and {len(keys)} S3 objects (restored at the next `up`)" in down.stdout
    assert _stack("status", state).returncode == 1
    assert not (state / "env").exists()
    for url in (env["MLFLOW_TRACKING_URI"] + "/health", env["AWS_ENDPOINT_URL"]):
        with pytest.raises(requests.ConnectionError):
            requests.get(url, timeout=2)

    # Up again: the registry still points at something, and the champion loads.
    again = _stack("up", state, ports)
    try:
        assert again.returncode == 0 and f"restored {len(keys)} S3 objects" in again.stdout
        load = subprocess.run(
            ["bash", "-c", f"set -a; . {state / 'env'}; set +a; {sys.executable} -m "
             "vae_pipeline.cli sample --model models:/conv-vae@champion --out samples.png"],
            cwd=ws, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert load.returncode == 0, load.stdout[-2000:] + load.stderr[-2000:]
        assert (ws / "samples.png").stat().st_size > 0
        # An artifact that is really gone is named as missing, not as a foreign model (the
        # client from before: the same endpoint, the server restarted on it).
        for key in (k for k in keys if k.startswith("mlflow/")):
            s3.delete_object(Bucket="vae-pipeline", Key=key)
        gone = subprocess.run(
            ["bash", "-c", f"set -a; . {state / 'env'}; set +a; {sys.executable} -m "
             "vae_pipeline.cli sample --model models:/conv-vae@champion --out again.png"],
            cwd=ws, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert gone.returncode == 1
        assert "the artifacts of models:/conv-vae@champion are missing: nothing at" in gone.stderr
    finally:
        _stack("down", state)
