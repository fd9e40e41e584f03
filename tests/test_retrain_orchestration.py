"""The retrain flow as an operated job (ephemeral Prefect, real MLflow SQLite, real DVC, real
torchrun): a rank killed mid-training, the GPU lock held by someone else, a promotion lock
held, re-runs that resume instead of redoing, retries of network steps only, timeouts that
stop torchrun, and the failure report."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient

from vae_pipeline.config import load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.registry.lock import promotion_lock
from vae_pipeline.registry.versions import champion

from .conftest import make_workspace
from .server_helpers import free_port

pytestmark = pytest.mark.slow


def _client(ws: Path) -> MlflowClient:
    uri = tracking_uri(load_config(ws / "params.yaml"), ws)
    return MlflowClient(uri, registry_uri=uri)


def _task_runs(flow_run_id) -> dict[str, list]:
    """name prefix -> the flow run's task runs of that task, from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
    found: dict[str, list] = {}
    for run in runs:
        found.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return found


def _states(flow_run_id) -> dict[str, str]:
    return {name: runs[-1].state.name for name, runs in _task_runs(flow_run_id).items()}


def _artifact(flow_run_id, key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        ArtifactFilterKey,
    )

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]),
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]),
            )
        )
    assert len(found) == 1, f"{key}: {len(found)} artifacts"
    return found[0].data


def _rank_processes() -> list[psutil.Process]:
    me = psutil.Process()
    return [
        p for p in me.children(recursive=True) if "vae_pipeline.worker" in " ".join(p.cmdline())
    ]


def _kill_ranks_after_first_checkpoint(ws: Path, stop: threading.Event) -> threading.Thread:
    """A preemption: SIGKILL every training rank once a checkpoint exists."""

    def watch():
        while not stop.is_set():
            if list((ws / "runs").glob("*/checkpoint.pt")):
                for proc in _rank_processes():
                    proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_failed_retrain_resumes_where_it_failed(tmp_path, capfd):
    from prefect.concurrency.sync import concurrency

    from flows.retrain import FAILURE_ARTIFACT, SUMMARY_ARTIFACT, train_lock_name

    ws = make_workspace(
        tmp_path / "ws",
        data={"limit": 2048},
        train={"epochs": 2, "checkpoint_every": 4, "max_restarts": 0},
        promotion={"lock_timeout_s": 3},
        orchestration={"retries": 1, "retry_delay_s": 0.2},
    )
    from flows.retrain import retrain

    # 1. A rank dies mid-epoch (no torchrun restarts): the flow fails at `train`.
    stop = threading.Event()
    _kill_ranks_after_first_checkpoint(ws, stop)
    first = retrain(workdir=str(ws), return_state=True)
    stop.set()
    assert first.is_failed()
    first_id = first.state_details.flow_run_id
    assert "step 'train' failed" in first.message
    assert "training failed (torchrun exit code" in first.message
    assert "has no champion" in first.message  # nothing was there to touch
    report = _artifact(first_id, FAILURE_ARTIFACT)
    assert "failed at step `train`" in report and "torchrun exit code" in report
    train_runs = _task_runs(first_id)["train"]
    assert [r.run_count for r in train_runs] == [1]  # training is never retried
    (run_dir,) = (ws / "runs").iterdir()
    assert (run_dir / "checkpoint.pt").is_file() and not (run_dir / "model.pt").exists()
    client = _client(ws)
    assert client.get_run(run_dir.name).info.status == "FAILED"
    assert client.search_registered_models() == []

    # 2. Re-run while another training holds the GPU lock and another promotion holds the
    #    promotion lock: it waits for the GPU, resumes training from the checkpoint, then
    #    fails at `promote` with the registry as it was.
    cfg = load_config(ws / "params.yaml")
    lock = concurrency(train_lock_name(cfg), occupy=1, strict=True)
    lock.__enter__()
    promo = promotion_lock(client, "conv-vae", cfg, "another promoter")
    promo.__enter__()
    result = {}
    capfd.readouterr()
    second_thread = threading.Thread(
        target=lambda: result.setdefault("state", retrain(workdir=str(ws), return_state=True))
    )
    second_thread.start()
    try:
        time.sleep(8)
        assert second_thread.is_alive()
        assert _rank_processes() == []  # waiting for the lock, not training
        assert not (run_dir / "model.pt").exists()
    finally:
        lock.__exit__(None, None, None)
    second_thread.join(timeout=300)
    promo.__exit__(None, None, None)
    second = result["state"]
    assert second.is_failed()
    second_id = second.state_details.flow_run_id
    assert "step 'promote' failed" in second.message
    out = capfd.readouterr()
    assert "resumed from" in out.out + out.err  # the trainer continued the checkpoint
    states = _states(second_id)
    assert states["prepare"] == states["open-mlflow-run"] == "Cached"
    assert states["train"] == states["evaluate"] == states["register"] == "Completed"
    assert list((ws / "runs").iterdir()) == [run_dir]  # the same MLflow run and folder
    history = client.get_metric_history(run_dir.name, "train_loss")
    assert sorted(m.step for m in history) == [1, 2]  # each epoch logged once
    (mv,) = client.search_model_versions("name='conv-vae'")
    assert champion(client, "conv-vae") is None  # the failure moved nothing

    # 3. Re-run with the lock free: nothing is trained or evaluated again.
    third = retrain(workdir=str(ws))
    states = _states(third["flow_run_id"])
    assert states["train"] == states["evaluate"] == "Cached"
    assert third["model_version"] == str(mv.version) == "1"
    assert third["decision"]["promoted"] and third["run_id"] == run_dir.name
    assert client.get_run(run_dir.name).info.status == "FINISHED"
    summary = _artifact(third["flow_run_id"], SUMMARY_ARTIFACT)
    assert f"[{run_dir.name}](http://127.0.0.1:5000/#/experiments/" in summary
    assert "/#/models/conv-vae/versions/1)" in summary
    assert "| train | " in summary and "| Cached |" in summary
    assert third["data_version"] in summary and "promoted to champion" in summary

    # 4. force=True redoes the work: a new run and version, same inputs, same numbers.
    forced = retrain(workdir=str(ws), force=True)
    assert forced["model_version"] == "2" and forced["run_id"] != run_dir.name
    assert set(_states(forced["flow_run_id"]).values()) == {"Completed"}
    assert forced["metrics"]["iw_nll"] == pytest.approx(third["metrics"]["iw_nll"], rel=1e-6)


def test_network_steps_retry_with_backoff_and_bad_input_does_not(tmp_path):
    from flows.retrain import FAILURE_ARTIFACT, retrain

    dead = f"http://127.0.0.1:{free_port()}"
    ws = make_workspace(
        tmp_path / "ws",
        registry={"tracking_uri": dead},
        orchestration={"retries": 2, "retry_delay_s": 0.2},
    )
    start = time.monotonic()
    state = retrain(workdir=str(ws), return_state=True)
    assert state.is_failed() and "step 'preflight' failed" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs["preflight"]] == [3]  # 1 try + 2 retries
    assert "version-data" not in runs  # nothing after it started
    assert time.monotonic() - start >= 0.2 + 0.4 * 0.8  # backoff 0.2 s then 0.4 s, jittered
    assert "the registry was not reached" in state.message
    assert "is not reachable" in _artifact(state.state_details.flow_run_id, FAILURE_ARTIFACT)

    ws2 = make_workspace(
        tmp_path / "ws2",
        data={"source": str(tmp_path / "no-such-folder")},
        orchestration={"retries": 2, "retry_delay_s": 0.2},
    )
    state = retrain(workdir=str(ws2), return_state=True)
    assert state.is_failed() and "step 'version-data' failed" in state.message
    assert "no-such-folder" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs["version-data"]] == [1]  # bad input: no retry


def test_a_step_timeout_stops_torchrun_and_its_processes(tmp_path):
    """The train step's limit (orchestration.train_timeout_s) reaches the launcher as an
    exception in its wait; the whole process group it started is stopped."""
    from prefect import flow, task

    from vae_pipeline.train.launch import run_torchrun

    pid_file = tmp_path / "pids"
    script = (
        "import os, subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'])"
        " for _ in range(2)]\n"
        f"open({str(pid_file)!r}, 'w').write(' '.join(str(k.pid) for k in kids))\n"
        "time.sleep(300)\n"
    )

    @task(timeout_seconds=3)
    def long_step():
        return run_torchrun([sys.executable, "-c", script], tmp_path)

    @flow
    def job():
        return long_step()

    start = time.monotonic()
    state = job(return_state=True)
    assert state.is_failed() and "timed out" in state.message.lower()
    assert time.monotonic() - start < 60
    pids = [int(p) for p in pid_file.read_text().split()]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(psutil.pid_exists(p) for p in pids):
        time.sleep(0.1)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"]
    assert alive == []


def test_flow_parameters_choose_source_and_promotion(tmp_path):
    """`source` and `promote` parameters (what a deployment run sets) override params."""
    from flows.retrain import retrain

    from .conftest import fashion_mnist_pngs

    images = fashion_mnist_pngs(tmp_path / "incoming", 0, 400)
    ws = make_workspace(tmp_path / "ws", train={"nproc_per_node": 1})
    summary = retrain(workdir=str(ws), source=str(images), promote=False)
    assert summary["decision"] is None
    client = _client(ws)
    assert champion(client, "conv-vae") is None
    assert client.get_run(summary["run_id"]).data.params["data.source"] == str(images)
    manifest = (ws / "data/prepared/manifest.json").read_text()
    assert '"class0"' in manifest  # the folder's labels, not Fashion-MNIST's names

    # The same work against another MLflow store is new there: the cached run (which lives
    # in the first store) is not reused.
    other = f"sqlite:///{ws / 'other.db'}"
    again = retrain(
        workdir=str(ws),
        source=str(images),
        promote=False,
        overrides=[f"registry.tracking_uri={other}"],
    )
    assert again["run_id"] != summary["run_id"]
    assert MlflowClient(other).get_run(again["run_id"]).info.status == "FINISHED"
    assert again["metrics"]["iw_nll"] == pytest.approx(summary["metrics"]["iw_nll"], rel=1e-6)


def test_the_cli_retrain_has_flags_for_the_deployment_parameters():
    result = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "retrain", "--help"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0
    for flag in ("--source", "--no-promote", "--force"):
        assert flag in result.stdout


def test_a_non_finite_model_reaches_register_once(tmp_path):
    """The one error rule in the flow: the register step retries network trouble, but a model
    with a non-finite weight is bad input (a UserError) and is refused once, not retried."""
    from prefect import flow

    from flows.retrain import Steps, register
    from vae_pipeline.model import ConvVAE
    from vae_pipeline.train.checkpoint import atomic_save

    ws = make_workspace(tmp_path / "ws", orchestration={"retries": 2, "retry_delay_s": 0.2})
    cfg = load_config(ws / "params.yaml")
    model = ConvVAE(cfg.data.channels, cfg.data.image_size, cfg.model.latent_dim)
    weights = model.state_dict()
    weights["fc_mu.weight"][0, 0] = float("nan")
    atomic_save({"hparams": model.hparams(), "state_dict": weights}, ws / "model.pt")
    metrics = {"elbo": -100.0, "recon": 90.0, "kl": 10.0, "iw_nll": 99.0}

    @flow(name="register-only")
    def register_only():
        steps = Steps(cfg, force=False)
        steps.run(register, cfg, ws, "run-id", ws / "model.pt", metrics, network=True)

    state = register_only(return_state=True)
    assert state.is_failed() and "non-finite values in fc_mu.weight" in state.message
    runs = _task_runs(state.state_details.flow_run_id)
    assert [r.run_count for r in runs["register"]] == [1]  # bad input: no retry
    assert _client(ws).search_registered_models() == []  # nothing was registered
