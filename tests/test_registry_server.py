"""The registry over HTTP: a real `mlflow server` on 127.0.0.1 (SQLite backend, artifacts proxied
to S3 on moto's server), `mlflow models serve` answering a real request, two promoters racing,
and the pre-flight check that stops a retrain before any work when the server is down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import numpy as np
import pytest
import requests
import torch
from moto.server import ThreadedMotoServer

from vae_pipeline import pipeline, tracking
from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.elbo import elbo_terms
from vae_pipeline.evaluate import evaluate
from vae_pipeline.model import ConvVAE
from vae_pipeline.registry.history import history
from vae_pipeline.registry.lock import lock_entries
from vae_pipeline.registry.promotion import promote_if_better, rollback
from vae_pipeline.train.checkpoint import save_model

from .conftest import make_workspace, tiny_params
from .registry_helpers import add_version, evidence, registry_cfg
from .server_helpers import free_port, stop, wait_http

pytestmark = pytest.mark.slow

BUCKET = "mlflow"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="module")
def s3():
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **_boto_creds())
    client.create_bucket(Bucket=BUCKET)
    yield endpoint, client
    server.stop()


def _boto_creds() -> dict:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


@pytest.fixture(scope="module")
def server(s3, tmp_path_factory):
    """`mlflow server` with two worker processes; artifacts go through it to the moto bucket."""
    endpoint, _ = s3
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": endpoint}
    log = open(root / "server.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
            "--artifacts-destination", f"s3://{BUCKET}/artifacts",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(uri + "/health", 120, proc)
        yield uri
    finally:
        stop(proc)
        log.close()


def test_preflight_passes_on_a_live_server_and_fails_fast_on_a_dead_one(server):
    tracking.preflight(server)
    dead = f"http://user:secret@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailable, match="is not reachable") as err:
        tracking.preflight(dead)
    assert time.monotonic() - started < 10
    assert "secret" not in str(err.value) and "***@127.0.0.1" in str(err.value)


def test_retrain_stops_before_any_work_when_mlflow_is_down(tmp_path):
    from flows.retrain import RetrainFailed, retrain

    ws = make_workspace(tmp_path / "ws")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RetrainFailed, match=f"step 'preflight' failed: MLflow .*{dead}") as info:
        retrain(
            workdir=str(ws),
            overrides=[f"registry.tracking_uri={dead}", "orchestration.retries=0"],
        )
    assert isinstance(info.value.__cause__, tracking.TrackingUnavailable)
    assert not (ws / "data").exists() and not (ws / "runs").exists()  # nothing ingested/trained


def _train_a_little(model: ConvVAE, images: torch.Tensor, steps: int) -> ConvVAE:
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for step in range(steps):
        batch = images[(step * 64) % len(images) :][:64]
        loss = -elbo_terms(model, to_unit_float(batch))["elbo"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def registered(server, tmp_path_factory):
    """Two real models registered through the server: v1 untrained, v2 trained a little."""
    ws = make_workspace(tmp_path_factory.mktemp("srv") / "ws")
    # An untrained model has no active units; the collapse guard (tested in test_registry.py)
    # is off here so that it can be the first champion.
    cfg = build_config(
        tiny_params(registry={"tracking_uri": server}, promotion={"min_active_units": 0})
    )
    snapshot_source(cfg, ws)
    pipeline.prepare_data(cfg, ws)
    train = PreparedSplit(ws / cfg.data.prepared_dir, "train").tensor()
    versions = []
    for name, steps in (("untrained", 0), ("trained", 60)):
        torch.manual_seed(0)
        model = _train_a_little(ConvVAE(1, 32, cfg.model.latent_dim), train, steps)
        weights = ws / name / "model.pt"
        weights.parent.mkdir()
        save_model(model, weights, data_version="unversioned")
        metrics = evaluate(cfg, model, ws)
        run_id = tracking.start_run(cfg, server, ws, name, {})
        versions.append(pipeline.register(cfg, run_id, weights, metrics, ws))
        tracking.finish_run(server, run_id)
    # A retried register step (same run) must return the same version and log nothing new.
    client = tracking.client_for(server)
    assert pipeline.register(cfg, run_id, weights, metrics, ws) == versions[-1]
    assert len(client.search_model_versions("name='conv-vae'")) == 2
    experiment = client.get_run(run_id).info.experiment_id
    logged = client.search_logged_models([experiment], f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in logged) == ["model", "pytorch"]  # logged once, not twice
    return ws, cfg, versions


def test_register_gate_promote_rollback_over_http(registered, server, s3):
    ws, cfg, (v1, v2) = registered
    client = tracking.client_for(server)
    assert pipeline.promote(cfg, v1, ws, actor="ci").promoted
    decision = pipeline.promote(cfg, v2, ws, actor="ci")
    assert decision.promoted and decision.champion_evidence == "stored"
    assert decision.upper_bound < 0 and decision.candidate_value < decision.champion_value
    assert str(client.get_model_version_by_alias("conv-vae", "champion").version) == v2
    rollback(cfg, server, "drill", actor="ci")
    assert str(client.get_model_version_by_alias("conv-vae", "champion").version) == v1
    assert [e["action"] for e in history(client, "conv-vae")] == [
        "promote",
        "promote",
        "rollback",
    ]
    # The artifacts went through the server into the S3 bucket.
    _, s3_client = s3
    keys = [o["Key"] for o in s3_client.list_objects_v2(Bucket=BUCKET)["Contents"]]
    assert any(k.endswith("reports/per_example_iw_nll.npy") for k in keys)
    assert any(k.endswith("model.pt") for k in keys)
    assert any(k.endswith("model.pt2") for k in keys)  # the PyTorch flavor (torch.export)
    # The CLI reads the same history over HTTP.
    out = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "history", "--json"],
        cwd=ws, env={**os.environ, "MLFLOW_TRACKING_URI": server},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[-1]["reason"] == "drill" and events[-1]["version"] == v1


def test_mlflow_models_serve_answers_a_real_request(registered, server, tmp_path):
    import mlflow.pyfunc

    ws, cfg, _ = registered
    port = free_port()
    # `mlflow models serve` execs `uvicorn` from PATH, as in an activated environment.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": server, "PATH": path}
    log = open(tmp_path / "serve.log", "w")  # noqa: SIM115 (open for the server's lifetime)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "mlflow", "models", "serve",
            "-m", "models:/conv-vae@champion", "--env-manager", "local",
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        try:
            wait_http(f"http://127.0.0.1:{port}/ping", 120, proc)
        except (RuntimeError, TimeoutError) as exc:
            log.flush()
            raise AssertionError(
                f"{exc}:\n{(tmp_path / 'serve.log').read_text()[-3000:]}"
            ) from None
        images = PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor()[:3]
        x = images.float().numpy() / 255.0
        answers = {}
        for output in ("latent_mean", "score", "iw_score"):
            response = requests.post(
                f"http://127.0.0.1:{port}/invocations",
                json={"inputs": x.tolist(), "params": {"output": output, "k": 8}},
                timeout=60,
            )
            assert response.status_code == 200, response.text
            answers[output] = np.asarray(response.json()["predictions"])
        tracking.client_for(server)
        local = mlflow.pyfunc.load_model("models:/conv-vae@champion")
        np.testing.assert_allclose(answers["latent_mean"], local.predict(x), rtol=1e-5, atol=1e-5)
        for output in ("score", "iw_score"):
            expected = local.predict(x, params={"output": output, "k": 8})
            np.testing.assert_allclose(answers[output], expected, rtol=1e-5)
        assert answers["latent_mean"].shape == (3, cfg.model.latent_dim)
    finally:
        stop(proc)
        log.close()


RACER = """
import json, sys
from vae_pipeline.registry.promotion import promote_if_better
from tests.registry_helpers import registry_cfg
uri, version, go, workdir = sys.argv[1:5]
import pathlib, time
while not pathlib.Path(go).exists():
    time.sleep(0.01)
cfg = registry_cfg(uri, "race-vae")
decision = promote_if_better(cfg, uri, version, pathlib.Path(workdir), actor=version)
print(json.dumps(decision.__dict__))
"""


def test_two_racing_promotions_are_serialised(server, tmp_path):
    client = tracking.client_for(server)
    name = "race-vae"
    v1 = add_version(client, evidence(1), name=name)
    v2 = add_version(client, evidence(2, shift=-1.0), name=name)
    v3 = add_version(client, evidence(3, shift=-2.0), name=name)  # best
    promote_if_better(registry_cfg(server, name), server, v1, tmp_path, actor="setup")
    go = tmp_path / "go"
    repo = Path(__file__).resolve().parents[1]
    racers = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, server, version, str(go), str(tmp_path)],
            cwd=repo,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for version in (v2, v3)
    ]
    time.sleep(3)  # both are importing; then they start together
    go.touch()
    outputs = [racer.communicate(timeout=300) for racer in racers]
    for racer, (_, err) in zip(racers, outputs, strict=True):
        assert racer.returncode == 0, err
    events = history(client, name)
    assert len(events) == 3
    # Serialised: each decision was made against the champion the previous one left.
    champion_after = v1
    for event in events[1:]:
        assert event["from_champion"] == champion_after
        if event["action"] == "promote":
            champion_after = event["version"]
    # Whatever the order, the best model ends as champion and the aliases agree with the history.
    assert champion_after == v3
    assert str(client.get_model_version_by_alias(name, "champion").version) == v3
    promoted = [e for e in events if e["action"] == "promote"]
    assert (
        str(client.get_model_version_by_alias(name, "previous-champion").version)
        == (promoted[-1]["from_champion"])
    )
    assert lock_entries(client, name) == []


def test_eight_promoters_meeting_a_stale_lock_never_hold_it_together(server):
    from .lock_stress import overlaps, trials

    for held in trials(server, n_trials=3):
        intervals = [h for h in held if isinstance(h, tuple)]
        assert len(intervals) == 8, held
        assert overlaps(intervals) == []
