"""Deployments: prefect.yaml rendered from params, and a real `prefect server` on 127.0.0.1 with
a process worker running the scheduled `retrain` and `monitor` deployments, the retrain started
by the monitor's drift event through its trigger."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient

from flows import deploy
from vae_pipeline.config import load_config
from vae_pipeline.config.environment import tracking_uri

from .conftest import REPO, copy_project_files, fashion_mnist_pngs, make_workspace
from .server_helpers import free_port, stop, wait_http


def _cli(cwd: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_the_committed_prefect_yaml_is_rendered_from_params_yaml():
    result = _cli(REPO, "deploy", "--check")
    assert result.returncode == 0, result.stderr
    result = _cli(REPO, "deploy", "--check", "--set", "orchestration.retrain_cron='0 4 * * *'")
    assert result.returncode == 1
    assert "prefect.yaml does not match" in result.stderr


def test_rendered_deployments_carry_the_schedules_pool_and_parameters():
    cfg = load_config(
        REPO / "params.yaml",
        [
            "orchestration.work_pool=gpu-pool",
            "orchestration.retrain_cron='15 2 * * 1'",
            "orchestration.timezone=Europe/Berlin",
            "monitor.cron=null",
        ],
    )
    doc = yaml.safe_load(deploy.render(cfg, ["train.epochs=5"]))
    retrain, monitor = doc["deployments"]
    assert retrain["entrypoint"] == "flows/retrain.py:retrain"
    assert retrain["work_pool"]["name"] == monitor["work_pool"]["name"] == "gpu-pool"
    assert retrain["schedules"] == [
        {"cron": "15 2 * * 1", "timezone": "Europe/Berlin", "slug": "retrain-cron"}
    ]
    assert monitor["schedules"] == []  # monitor.cron null: triggered by hand only
    assert retrain["parameters"] == {"overrides": ["train.epochs=5"]}
    assert monitor["parameters"]["retrain_deployment"] == "retrain/retrain"
    assert retrain["concurrency_limit"]["limit"] == 1
    # The flows' own signatures accept every parameter the deployments set.
    import inspect

    from flows.monitor import monitor as monitor_flow
    from flows.retrain import retrain as retrain_flow

    assert set(retrain["parameters"]) <= set(inspect.signature(retrain_flow.fn).parameters)
    assert set(monitor["parameters"]) <= set(inspect.signature(monitor_flow.fn).parameters)
    # the retrain runs on the monitor's event and on a team's own retrain request
    [trigger] = retrain["triggers"]
    assert trigger["expect"] == ["vae-pipeline.drift.detected", "vae-pipeline.retrain.requested"]
    assert trigger["match"] == {"prefect.resource.id": "vae-pipeline.source.*"}
    assert set(trigger["parameters"]) <= set(inspect.signature(retrain_flow.fn).parameters)
    assert "triggers" not in monitor
    assert {"source", "overrides", "promote", "force"} <= set(
        inspect.signature(retrain_flow.fn).parameters
    )


def test_deployments_with_a_workdir_run_there_with_the_deploy_folders_params(tmp_path):
    """`deploy --workdir` (a container's state volume): both deployments get the folder and the
    absolute params file, each as its own mapping (no YAML anchors shared between them)."""
    cfg = load_config(REPO / "params.yaml")
    text = deploy.render(cfg, ["data.remote=s3"], "/var/lib/vae-pipeline", "/srv/p/params.yaml")
    assert "&id" not in text and "*id" not in text
    retrain, monitor = yaml.safe_load(text)["deployments"]
    for d in (retrain, monitor):
        assert d["parameters"]["workdir"] == "/var/lib/vae-pipeline"
        assert d["parameters"]["params"] == "/srv/p/params.yaml"
        assert d["parameters"]["overrides"] == ["data.remote=s3"]
    # The flows resolve `params` against `workdir`; an absolute one stays itself.
    assert Path("/var/lib/vae-pipeline") / "/srv/p/params.yaml" == Path("/srv/p/params.yaml")
    # The CLI's --check compares with the same rendering.
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "vae_pipeline.cli", "deploy", "--check", "--workdir", "state"]
    (tmp_path / "prefect.yaml").write_text(
        deploy.render(cfg, (), str(tmp_path / "state"), str(tmp_path / "params.yaml"))
    )
    ok = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    stale = subprocess.run(cli[:-2], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert stale.returncode == 1 and "does not match" in stale.stderr


def test_deploy_without_a_server_says_how_to_start_one(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    result = _cli(ws, "deploy", env=env)
    assert result.returncode == 1
    assert "PREFECT_API_URL is not set" in result.stderr and "prefect server start" in result.stderr
    assert not (ws / "prefect.yaml").exists()  # nothing written before the check


class PrefectServer:
    """`prefect server start` on 127.0.0.1 with its own PREFECT_HOME; stopped by the test."""

    def __init__(self, home: Path):
        self.port = free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(home),
            "PREFECT_API_URL": self.api,
            "PREFECT_LOGGING_LEVEL": "INFO",
        }
        self.log = open(home.parent / "server.log", "w")  # noqa: SIM115 (open while it runs)
        server_env = {k: v for k, v in self.env.items() if k != "PREFECT_API_URL"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start",
             "--host", "127.0.0.1", "--port", str(self.port)],
            env=server_env, stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_http(self.api + "/health", 120, self.proc)

    def get(self, path: str):
        response = requests.get(self.api + path, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, body: dict):
        response = requests.post(self.api + path, json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def wait_flow_run(self, run_id: str, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.get(f"/flow_runs/{run_id}")
            if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                return run
            time.sleep(1)
        raise TimeoutError(f"flow run {run_id} did not finish within {timeout} s")

    def stop(self):
        stop(self.proc)
        self.log.close()


def _triggered_runs(server: PrefectServer, deployment_id: str) -> list[dict]:
    runs = server.post(
        "/flow_runs/filter",
        {"deployments": {"id": {"any_": [deployment_id]}}, "sort": "EXPECTED_START_TIME_ASC"},
    )
    return [r for r in runs if (r.get("created_by") or {}).get("type") == "AUTOMATION"]


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        time.sleep(1)
    raise TimeoutError(f"{what} within {timeout} s")


@pytest.mark.slow
def test_scheduled_deployments_run_on_a_process_worker(tmp_path):
    ws = make_workspace(
        tmp_path / "ws",
        orchestration={"retrain_cron": "0 3 1 1 *", "work_pool": "test-pool"},
        monitor={"cron": "30 4 1 1 *"},  # next January: no scheduled run fires during the test
    )
    copy_project_files(ws, "flows")  # a clone of the project holds flows/
    shifted = fashion_mnist_pngs(tmp_path / "incoming", 0, 200, invert=True)
    (tmp_path / "home").mkdir()
    server = PrefectServer(tmp_path / "home")
    worker = None
    try:
        result = _cli(ws, "deploy", env=server.env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "deployed retrain/retrain" in result.stdout
        assert "prefect worker start --pool test-pool" in result.stdout
        assert (ws / "prefect.yaml").read_text() == deploy.render(load_config(ws / "params.yaml"))

        retrain = server.get("/deployments/name/retrain/retrain")
        monitor = server.get("/deployments/name/monitor/monitor")
        assert [s["schedule"]["cron"] for s in retrain["schedules"]] == ["0 3 1 1 *"]
        assert [s["schedule"]["cron"] for s in monitor["schedules"]] == ["30 4 1 1 *"]
        assert monitor["schedules"][0]["parameters"] == {"always": False}
        assert retrain["work_pool_name"] == "test-pool"
        assert retrain["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(ws)}}
        ]
        assert server.get("/work_pools/test-pool")["type"] == "process"
        limits = server.post("/v2/concurrency_limits/filter", {})
        assert any(lim["name"].startswith("vae-pipeline-train@") for lim in limits)

        worker_log = open(tmp_path / "worker.log", "w")  # noqa: SIM115
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", "test-pool"],
            cwd=ws, env=server.env, stdout=worker_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        run = server.post(f"/deployments/{retrain['id']}/create_flow_run", {})
        done = server.wait_flow_run(run["id"], 420)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]

        uri = tracking_uri(load_config(ws / "params.yaml"), ws)
        client = MlflowClient(uri, registry_uri=uri)
        mv = client.get_model_version_by_alias("conv-vae", "champion")
        assert str(mv.version) == "1" and mv.tags["flow_run_id"] == run["id"]

        # `deploy` linked the retrain deployment to its trigger (an automation)
        [automation] = [
            a
            for a in server.post("/automations/filter", {})
            if a["actions"][0].get("deployment_id") == retrain["id"]
        ]
        assert set(automation["trigger"]["expect"]) == {
            "vae-pipeline.drift.detected",
            "vae-pipeline.retrain.requested",
        }

        # The monitor deployment finds the inverted images shifted and emits the drift event;
        # the retrain deployment's trigger starts a run on it, which the worker runs.
        run = server.post(
            f"/deployments/{monitor['id']}/create_flow_run",
            {"parameters": {"source": str(shifted)}},
        )
        done = server.wait_flow_run(run["id"], 300)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        events = _wait_for(  # the server persists events in batches
            lambda: server.post(
                "/events/filter", {"filter": {"event": {"name": ["vae-pipeline.drift.detected"]}}}
            )["events"],
            60,
            "the monitor's drift event did not arrive",
        )
        assert len(events) == 1
        payload = events[0]["payload"]
        assert payload["retrain_source"] == str(shifted) and payload["drift"] is True
        assert payload["champion_version"] == "1" and payload["statistics"]["new_n"] > 0
        assert events[0]["resource"]["prefect.resource.id"] == f"vae-pipeline.source.{shifted}"
        [triggered] = _wait_for(
            lambda: _triggered_runs(server, retrain["id"]), 120, "no triggered retrain run"
        )
        assert triggered["parameters"]["source"] == str(shifted)  # the payload's source
        _wait_for(
            lambda: server.get(f"/flow_runs/{triggered['id']}")["state"]["type"] == "RUNNING",
            300,
            "the triggered retrain did not start",
        )
        # A second drift event while that retrain runs (a team's own, by the CLI): its run
        # waits for the first (the deployment's concurrency limit) and trains nothing anew.
        emit = subprocess.run(
            [sys.executable, "-m", "prefect", "event", "emit", "vae-pipeline.drift.detected",
             "--resource-id", f"vae-pipeline.source.{shifted}",
             "--payload", f'{{"retrain_source": "{shifted}"}}'],
            env=server.env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert emit.returncode == 0, emit.stderr
        first_run, second_run = _wait_for(
            lambda: (runs := _triggered_runs(server, retrain["id"]))[1:] and runs,
            120,
            "the second event started no run",
        )
        done = server.wait_flow_run(first_run["id"], 420)
        assert done["state"]["type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-3000:]
        done_second = server.wait_flow_run(second_run["id"], 420)
        assert done_second["state"]["type"] == "COMPLETED"
        assert done_second["start_time"] >= done["end_time"]  # one at a time
        versions = client.search_model_versions("name='conv-vae'")
        assert sorted(int(v.version) for v in versions) == [1, 2]  # one new model, not two
        v2 = client.get_model_version("conv-vae", "2")
        assert v2.tags["flow_run_id"] == first_run["id"]

        # The server's scheduler put the cron's next runs on the calendar (it failed on every
        # loop under SQLAlchemy 2.1: "Can't evaluate bulk DML statement"; 2.0 is pinned).
        scheduled = _wait_for(
            lambda: server.post(
                "/flow_runs/filter",
                {
                    "deployments": {"id": {"any_": [retrain["id"]]}},
                    "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                },
            ),
            120,
            "the scheduler scheduled no run of the retrain's cron",
        )
        assert all(r["expected_start_time"].endswith("-01-01T03:00:00Z") for r in scheduled)
        assert "bulk DML" not in (tmp_path / "server.log").read_text()
    finally:
        if worker is not None:
            stop(worker)
        server.stop()
