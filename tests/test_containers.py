"""The stack's images run for real (podman + runc, images built on a local Debian base by
infra/podman/images.sh): two worker containers on a container network, each a node with its
own hostname, train as one job (`vae-pipeline train --nnodes 2`, c10d rendezvous, gloo) on a
shared volume; the weights equal a one-node run of the same global batch bit for bit, and a
node's container killed mid-epoch, then both restarted, ends with the same weights. And the
same two-node job launched through Kubeflow's Python SDK (`TrainerClient`, its container
backend on podman), the code path a user points at a cluster, ends with the same weights too.

Deselected by default (`-m containers`: `make test-containers`), since the first image build
takes minutes."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import torch

from vae_pipeline.config import build_config, save_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train.checkpoint import load_model

from .conftest import tiny_params
from .container_helpers import TAG, podman, podman_env

# a first build of the worker image (PyPI's torch with its CUDA libraries) takes minutes
pytestmark = [pytest.mark.slow, pytest.mark.containers, pytest.mark.timeout(1800)]

WORKER = f"localhost/vae-pipeline-worker:{TAG}"
IMAGE_USER = 10001  # the worker image's user (infra/docker/worker.Dockerfile)
# torchrun gives each rank one thread when a node runs several and all cores when it runs one:
# the same threads on both sides, or the convolutions sum in another order
THREADS = ["--env", "OMP_NUM_THREADS=1"]


@pytest.fixture(scope="module")
def network(images):
    name = f"vae-test-{uuid.uuid4().hex[:8]}"
    podman("network", "create", name)
    yield name
    podman("network", "rm", "--force", name, check=False)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A prepared workspace on the shared volume, writable by the image's user."""
    root = tmp_path_factory.mktemp("containers")
    # 4 steps an epoch; checkpoints every 3 steps, so a kill lands after one, mid-epoch
    cfg = build_config(tiny_params(train={"epochs": 3, "checkpoint_every": 3}))
    snapshot_source(cfg, root)
    prepare(cfg, root)
    save_config(cfg, root / "params.yaml")
    for folder, _, files in os.walk(root):
        for name in [folder, *(os.path.join(folder, f) for f in files)]:
            os.chown(name, IMAGE_USER, IMAGE_USER)
    return root


def _start_node(network: str, root: Path, node: str, out: str, run_id: str) -> str:
    name = f"{network}-{node}"
    podman(
        "run", "--detach", "--name", name, "--hostname", node, "--network", network,
        "--network-alias", node, *THREADS, "--volume", f"{root}:/work", "--workdir", "/work", WORKER,
        "vae-pipeline", "train", "--params", "params.yaml", "--out-dir", out,
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", "node0:29500",
        "--rdzv-id", run_id,
    )  # fmt: skip
    return name


def _finish(*names: str) -> list[tuple[int, str]]:
    """Wait for the containers; their exit codes and logs; then remove them."""
    results = []
    for name in names:
        try:
            code = int(podman("wait", name, timeout=300).stdout.strip())
        except subprocess.TimeoutExpired:
            code = -1  # hung: stopped below, its logs shown
        logs = podman("logs", name)
        results.append((code, logs.stdout + logs.stderr))
    for name in names:
        podman("rm", "--force", "--volumes", "--time", "0", name)  # and its anonymous volume
    return results


def _weights(path: Path) -> torch.Tensor:
    model, _ = load_model(path)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _two_nodes(network: str, root: Path, out: str) -> list[tuple[int, str]]:
    run_id = uuid.uuid4().hex[:8]
    names = [_start_node(network, root, f"node{i}", out, run_id) for i in (0, 1)]
    return _finish(*names)


@pytest.fixture(scope="module")
def one_node(images, network, workspace):
    """The reference: one container, two ranks (the same global batch)."""
    name = f"{network}-single"
    podman(
        "run", "--detach", "--name", name, "--hostname", "single", "--network", network,
        "--volume", f"{workspace}:/work", "--workdir", "/work", WORKER,
        "vae-pipeline", "train", "--params", "params.yaml", "--out-dir", "single",
        "--nproc-per-node", "2",
    )  # fmt: skip
    ((code, logs),) = _finish(name)
    assert code == 0, logs[-3000:]
    return _weights(workspace / "single" / "model.pt")


@pytest.fixture(scope="module")
def two_nodes(images, network, workspace):
    results = _two_nodes(network, workspace, "nodes")
    for code, logs in results:
        assert code == 0, logs[-3000:]
    return results


def test_two_containers_train_as_two_nodes_like_one_node(workspace, one_node, two_nodes):
    logs = "".join(log for _, log in two_nodes)
    assert "--nnodes=2" in logs and "--rdzv-endpoint=node0:29500" in logs
    # each node is its own host: one torchrun log per hostname in the shared out dir
    hosts = sorted(p.name.split("-")[1] for p in (workspace / "nodes").glob("torchrun-*.log"))
    assert hosts == ["node0", "node1"]
    assert "world size 2" in logs
    torch.testing.assert_close(
        _weights(workspace / "nodes" / "model.pt"), one_node, rtol=0, atol=0
    )  # bit for bit


def test_a_node_killed_mid_epoch_then_both_restarted_ends_with_the_same_weights(
    network, workspace, two_nodes
):
    run_id = uuid.uuid4().hex[:8]
    out = workspace / "killed"
    names = [_start_node(network, workspace, f"node{i}", "killed", run_id) for i in (0, 1)]
    deadline = time.monotonic() + 300
    while not (out / "checkpoint.pt").exists():  # the first mid-epoch checkpoint (step 3)
        assert time.monotonic() < deadline, "no checkpoint within 5 minutes"
        time.sleep(0.05)
    podman("kill", "--signal", "KILL", names[1])
    killed = _finish(*names)
    assert killed[1][0] == 137  # SIGKILL
    assert killed[0][0] != 0  # node0 lost its peer: the job failed, not hung
    assert not (out / "model.pt").exists()
    restarted = _two_nodes(network, workspace, "killed")
    for code, logs in restarted:
        assert code == 0, logs[-3000:]
    logs = "".join(log for _, log in restarted)
    assert re.search(r"resumed from \S+ at epoch \d+, step [1-9]", logs), logs[-3000:]  # mid-epoch
    torch.testing.assert_close(
        _weights(out / "model.pt"), _weights(workspace / "nodes" / "model.pt"), rtol=0, atol=0
    )


# --- the same job through Kubeflow's SDK (TrainerClient, container backend on podman) ---------


def _train_in_kubeflow_container():
    """What TrainerClient runs under torchrun in each node's container: the rank module, on the
    job's folder (the SDK mounts it at /workspace). Self-contained: the SDK ships its source."""
    from vae_pipeline.worker import main

    main(["--params", "/workspace/params.yaml", "--out-dir", "/workspace/kubeflow"])


@pytest.fixture(scope="module")
def podman_api(tmp_path_factory):
    """podman's REST API on a socket of its own, which the SDK's podman adapter talks to."""
    sock = tmp_path_factory.mktemp("podman-api") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{sock}"],
        env=podman_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        assert service.poll() is None and time.monotonic() < deadline, (
            "podman service did not start"
        )
        time.sleep(0.1)
    yield f"unix://{sock}"
    service.terminate()
    service.wait(timeout=30)


def test_kubeflow_trainer_client_runs_the_two_node_job_like_one_node(
    podman_api, workspace, one_node, tmp_path, monkeypatch
):
    from kubeflow.trainer import CustomTrainer, TrainerClient
    from kubeflow.trainer.backends.container.types import (
        ContainerBackendConfig,
        TrainingRuntimeSource,
    )
    from kubeflow.trainer.options.common import Name

    # The SDK keeps each job's folder in ~/.kubeflow/trainer/containers/<job>, mounted at
    # /workspace in every node: the prepared data goes there, writable by the image's user.
    monkeypatch.setenv("HOME", str(tmp_path))
    job_name = "vae" + uuid.uuid4().hex[:8]
    folder = tmp_path / ".kubeflow" / "trainer" / "containers" / job_name
    folder.mkdir(parents=True)
    shutil.copytree(workspace / "data", folder / "data")
    shutil.copy2(workspace / "params.yaml", folder / "params.yaml")
    for path in [folder, *folder.rglob("*")]:
        os.chown(path, IMAGE_USER, IMAGE_USER)

    client = TrainerClient(
        backend_config=ContainerBackendConfig(
            container_runtime="podman",
            container_host=podman_api,
            pull_policy="Never",  # the local image; no registry
            runtime_source=TrainingRuntimeSource(sources=[]),  # the SDK's built-in runtimes
        )
    )
    job = client.train(
        trainer=CustomTrainer(
            func=_train_in_kubeflow_container,
            num_nodes=2,
            image=WORKER,
            env={"OMP_NUM_THREADS": "1"},  # as the other two-node runs (module docstring)
        ),
        options=[Name(name=job_name)],
    )
    try:
        done = client.wait_for_job_status(job, status={"Complete", "Failed"}, timeout=600)
        # get_job_logs without follow prints a generator's repr with podman-py 5 (SDK 0.5.0)
        logs = "".join(client.get_job_logs(job, step="node-0", follow=True))
        assert done.status == "Complete", logs[-3000:]
        assert [(s.name, s.status) for s in done.steps] == [
            ("node-0", "Complete"),
            ("node-1", "Complete"),
        ]
        assert done.num_nodes == 2
        torch.testing.assert_close(
            _weights(folder / "kubeflow" / "model.pt"), one_node, rtol=0, atol=0
        )  # bit for bit, as the plain two-container run
    finally:
        # the nodes' anonymous volumes (the image's VOLUME), which delete_job leaves behind
        nodes = podman("inspect", f"{job_name}-node-0", f"{job_name}-node-1", check=False)
        mounts = json.loads(nodes.stdout or "[]")
        volumes = [m["Name"] for c in mounts for m in c["Mounts"] if m["Type"] == "volume"]
        client.delete_job(job)  # its containers and network
        podman("volume", "rm", "--force", *volumes, check=False)
    assert podman("ps", "-a", "-q", "--filter", f"name={job_name}").stdout.strip() == ""
