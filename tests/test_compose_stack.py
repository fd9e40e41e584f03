"""infra/compose.yaml up for real under podman (podman-compose with infra/podman/compose.local.yaml:
PostgreSQL, Prefect's server and an S3 server built locally in place of the published images).

The worker creates the deployments; `prefect deployment run retrain/retrain` from the host runs
a tiny retrain on the worker against the servers in the containers (DVC push to the S3
container, MLflow's registry on PostgreSQL with basic auth, artifacts in S3); `champion` is set.
Then the stack goes down and up again, and the champion still loads and scores from the host
with only the client variables of docs/deployment.md. Wrong credentials stop a retrain at
preflight. No password appears in an image, a container's log, a Prefect log, an MLflow param
or tag, or the worker's volume.

Deselected by default (`-m containers`: `make test-containers`)."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
import uuid
from pathlib import Path

import boto3
import pytest
import requests
from mlflow.tracking import MlflowClient

from .conftest import REPO, fashion_mnist_pngs, make_workspace
from .container_helpers import TAG, podman, podman_env
from .server_helpers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(2400)]

COMPOSE = [
    str(Path(sys.executable).with_name("podman-compose")),
    "-f",
    str(REPO / "infra" / "compose.yaml"),
    "-f",
    str(REPO / "infra" / "podman" / "compose.local.yaml"),
]
# the tests' tiny settings (tests/conftest.py TINY), baked into the deployments by the worker
TINY_DEPLOY = (
    "--set data.limit=256 --set model.latent_dim=8 --set train.epochs=1 --set train.batch_size=64"
    " --set evaluate.iw_samples=4 --set evaluate.iw_chunk=4 --set evaluate.batch_size=128"
    " --set evaluate.n_samples=16 --set generation.fd_images=200 --set generation.fd_components=8"
    # no schedules: only the run the test starts
    " --set orchestration.retrain_cron=null --set monitor.cron=null"
)
# as docs/deployment.md and `make stack-containers-up` say (--no-deps: podman 4.3)
UP = ("up", "-d", "--no-deps")
SERVICES = ("postgres", "minio", "mlflow", "prefect", "worker")


class Stack:
    def __init__(self, root: Path):
        self.project = f"vae-stack-{uuid.uuid4().hex[:8]}"
        self.ports = {k: free_port() for k in ("MLFLOW_PORT", "PREFECT_PORT", "S3_PORT")}
        self.ports["S3_CONSOLE_PORT"] = free_port()
        # fresh random secrets: whatever is found later can only have come from this run
        self.secrets = {
            "POSTGRES_PASSWORD": "pg-" + secrets.token_hex(12),
            "MINIO_ROOT_PASSWORD": "s3-" + secrets.token_hex(12),
            "MLFLOW_ADMIN_PASSWORD": "ml-" + secrets.token_hex(12),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": "fl-" + secrets.token_hex(12),
            "PREFECT_PASSWORD": "pf-" + secrets.token_hex(12),
        }
        self.env_file = root / "stack.env"
        values = {
            "POSTGRES_USER": "vae",
            "MINIO_ROOT_USER": "vae-pipeline",
            "S3_BUCKET": "vae-pipeline",
            "MLFLOW_ADMIN_USERNAME": "admin",
            "PREFECT_AUTH_STRING": f"admin:{self.secrets['PREFECT_PASSWORD']}",
            "VAE_PIPELINE_DEPLOY_ARGS": TINY_DEPLOY,
            "VAE_IMAGE_TAG": TAG,
            **{k: v for k, v in self.secrets.items() if k != "PREFECT_PASSWORD"},
            **{k: str(v) for k, v in self.ports.items()},
        }
        self.env_file.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
        self.env_file.chmod(0o600)
        self.mlflow = f"http://127.0.0.1:{self.ports['MLFLOW_PORT']}"
        self.prefect = f"http://127.0.0.1:{self.ports['PREFECT_PORT']}/api"
        self.s3 = f"http://127.0.0.1:{self.ports['S3_PORT']}"
        self.prefect_auth = ("admin", self.secrets["PREFECT_PASSWORD"])

    def compose(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        result = subprocess.run(
            [*COMPOSE, "--env-file", str(self.env_file), "-p", self.project, *args],
            env=podman_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, f"podman-compose {args}: {result.stderr[-4000:]}"
        return result

    def container(self, service: str) -> str:
        return f"{self.project}_{service}_1"

    def logs(self) -> str:
        outputs = [
            podman("logs", self.container(s), check=False) for s in (*SERVICES, "minio-init")
        ]
        return "".join(out.stdout + out.stderr for out in outputs)

    def client_env(self, **extra: str) -> dict[str, str]:
        """What docs/deployment.md gives a client machine (MLflow's three variables), and no
        more of the stack: no S3 or database credentials."""
        keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG")}
        return {
            **keep,
            "MLFLOW_TRACKING_URI": self.mlflow,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.secrets["MLFLOW_ADMIN_PASSWORD"],
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DO_NOT_TRACK": "true",
            **extra,
        }

    def wait_ready(self, timeout: float = 600) -> None:
        """MLflow, Prefect and S3 answer from the host, and the worker created the deployments."""
        deadline = time.monotonic() + timeout
        pending = {
            "mlflow": lambda: requests.get(self.mlflow + "/health", timeout=3).ok,
            "s3": lambda: requests.get(self.s3, timeout=3).status_code < 500,
            "deployments": lambda: {
                d["name"]
                for d in requests.post(
                    self.prefect + "/deployments/filter", json={}, auth=self.prefect_auth,
                    timeout=5,
                ).json()
            } >= {"retrain", "monitor"},
        }  # fmt: skip
        while pending and time.monotonic() < deadline:
            for name, check in list(pending.items()):
                try:
                    if check():
                        del pending[name]
                except (requests.RequestException, ValueError, TypeError):
                    pass
            time.sleep(3)
        if pending:
            raise AssertionError(
                f"not ready after {timeout:.0f} s: {sorted(pending)}\n{self.logs()[-6000:]}"
            )


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("stack"))
    try:
        started = time.monotonic()
        stack.compose(*UP)
        stack.wait_ready()
        print(f"stack up and deployments created in {time.monotonic() - started:.0f} s")
        yield stack
    finally:
        subprocess.run(
            [*COMPOSE, "--env-file", str(stack.env_file), "-p", stack.project, "down", "-v"],
            env=podman_env(), capture_output=True, timeout=600,
        )  # fmt: skip
        stack.env_file.unlink(missing_ok=True)


def _s3_keys(stack: Stack) -> list[str]:
    s3 = boto3.client(
        "s3",
        endpoint_url=stack.s3,
        aws_access_key_id="vae-pipeline",
        aws_secret_access_key=stack.secrets["MINIO_ROOT_PASSWORD"],
        region_name="us-east-1",
    )
    return [
        obj["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket="vae-pipeline")
        for obj in page.get("Contents", [])
    ]


def _leaks(stack: Stack, text: str) -> list[str]:
    return [name for name, value in stack.secrets.items() if value in text]


def test_the_compose_stack_retrains_keeps_its_state_and_serves_the_champion(
    stack, tmp_path, monkeypatch
):
    # The worker's deployment, run from the host as docs/deployment.md says.
    prefect_env = {
        **os.environ,
        "PREFECT_API_URL": stack.prefect,
        "PREFECT_API_AUTH_STRING": ":".join(stack.prefect_auth),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
    }
    started = time.monotonic()
    run = subprocess.run(
        [str(Path(sys.executable).with_name("prefect")), "deployment", "run", "retrain/retrain",
         "--watch", "--watch-timeout", "1500"],
        env=prefect_env, capture_output=True, text=True, timeout=1600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:] + stack.logs()[-8000:]
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", run.stdout).group(1)
    flows = requests.post(
        stack.prefect + "/flow_runs/filter", json={}, auth=stack.prefect_auth, timeout=10
    ).json()
    assert [(f["id"], f["state"]["type"]) for f in flows] == [(flow_run_id, "COMPLETED")]
    print(f"retrain deployment run in {time.monotonic() - started:.0f} s")

    # champion set in MLflow's registry, whose store is the PostgreSQL container
    client = MlflowClient(stack.mlflow, registry_uri=stack.mlflow)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", stack.secrets["MLFLOW_ADMIN_PASSWORD"])
    champion = client.get_model_version_by_alias("conv-vae", "champion")
    run_info = client.get_run(champion.run_id)
    assert champion.version == "1"
    assert champion.tags["flow_run_id"] == flow_run_id
    rows = podman(
        "exec", stack.container("postgres"), "psql", "-U", "vae", "-d", "mlflow", "-At", "-c",
        "SELECT name, version FROM model_versions",
    ).stdout.split()  # fmt: skip
    assert rows == ["conv-vae|1"]
    # data versions pushed by DVC and the model's artifacts, both in the S3 container
    keys = _s3_keys(stack)
    data_version = champion.tags["data_version"]
    assert f"dvc/files/md5/{data_version[:2]}/{data_version[2:]}.dir" in keys
    assert any(k.startswith("mlflow/") and k.endswith("model.pt") for k in keys)

    # No secret in the containers' logs, the flow run's logs, MLflow's params and tags.
    flow_logs = requests.post(
        stack.prefect + "/logs/filter", json={"limit": 200}, auth=stack.prefect_auth, timeout=10
    ).json()
    assert flow_logs, "the flow run's logs reached the server"
    recorded = json.dumps(
        [flow_logs, flows, run_info.data.params, run_info.data.tags, champion.tags]
    )
    assert _leaks(stack, stack.logs()) == []
    assert _leaks(stack, recorded) == []

    # Down (containers gone, volumes kept) and up again: nothing of the state is lost.
    stack.compose("down", timeout=600)
    assert podman("ps", "-a", "--filter", f"name={stack.project}", "-q").stdout.strip() == ""
    stack.compose(*UP)
    stack.wait_ready()
    assert sorted(_s3_keys(stack)) == sorted(keys)

    # The champion loads and scores from the host with the client variables only.
    ws = make_workspace(tmp_path / "client")
    fashion_mnist_pngs(tmp_path / "images", 0, 20)
    score = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "score", "--model",
         "models:/conv-vae@champion", "--images", str(tmp_path / "images"),
         "--out", "scores.csv"],
        cwd=ws, env=stack.client_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert score.returncode == 0, score.stdout[-2000:] + score.stderr[-3000:]
    lines = (ws / "scores.csv").read_text().splitlines()
    assert len(lines) == 21 and "is_anomaly" in lines[0]

    # Wrong credentials: refused at preflight, before any data work.
    wrong = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "retrain"],
        cwd=ws,
        env=stack.client_env(
            MLFLOW_TRACKING_PASSWORD="not-the-password", PREFECT_HOME=str(tmp_path / "ph")
        ),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert wrong.returncode != 0
    assert "refused access (HTTP 401)" in wrong.stdout + wrong.stderr
    assert not (ws / "data").exists()

    # The worker's volume (workspace, DVC config, Prefect home) holds no secret either.
    volume = podman("volume", "inspect", f"{stack.project}_worker", "--format", "{{.Mountpoint}}")
    leaked = [
        str(path.relative_to(volume.stdout.strip()))
        for path in Path(volume.stdout.strip()).rglob("*")
        if path.is_file() and path.stat().st_size < 50_000_000
        and _leaks(stack, path.read_bytes().decode("latin-1"))
    ]  # fmt: skip
    assert leaked == []
    assert _leaks(stack, stack.logs()) == []


def test_no_secret_is_in_an_image(stack, images):
    """Every layer of every image of the stack, byte for byte (`podman save`)."""
    needles = [v.encode() for v in stack.secrets.values()]
    for image in images:
        save = subprocess.Popen(
            ["podman", "save", "--format", "docker-archive", image],
            env=podman_env(), stdout=subprocess.PIPE,
        )  # fmt: skip
        tail, size = b"", 0
        while chunk := save.stdout.read(1 << 22):
            window = tail + chunk
            assert not [n for n in needles if n in window], image
            tail, size = window[-64:], size + len(chunk)
        assert save.wait() == 0 and size > 10_000_000, image


def test_prefect_refuses_a_wrong_auth_string(stack):
    token = base64.b64encode(b"admin:wrong").decode()
    response = requests.post(
        stack.prefect + "/deployments/filter",
        json={},
        headers={"Authorization": f"Basic {token}"},
        timeout=5,
    )
    assert response.status_code == 401
