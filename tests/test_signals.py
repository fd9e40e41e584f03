"""Every process the CLI starts dies with it: SIGKILL and SIGTERM to `vae-pipeline train`,
with real signals, real torchrun and real ranks."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vae_pipeline.config import build_config, save_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train.launch import torchrun_env

from .conftest import tiny_params


def _descendants(pid: int) -> set[int]:
    """Every live process below `pid`, from /proc (children of children too)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":  # a zombie is already dead
                parents[int(entry.name)] = int(fields[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("signals")
    # long enough to be killed while training: many epochs of the tiny split
    cfg = build_config(tiny_params(train={"epochs": 500, "nproc_per_node": 2}))
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root, save_config(cfg, root / "long.yaml")


def _start_training(root: Path, params: Path, out: str) -> tuple[subprocess.Popen, set[int]]:
    cmd = [sys.executable, "-m", "vae_pipeline.cli", "train", "--params", str(params),
           "--out-dir", out]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=root, env=torchrun_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until both ranks have written their first checkpoint
        if (root / out / "checkpoint.pt").exists():
            procs = _descendants(proc.pid)
            if len(procs) >= 3:  # torchrun and two ranks (and their helpers)
                return proc, procs
        if proc.poll() is not None:
            pytest.fail(f"training ended early: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    pytest.fail("training did not start within 120 s")


def _all_gone(pids: set[int], within: float) -> set[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        left = {pid for pid in pids if _alive(pid)}
        if not left:
            return set()
        time.sleep(0.2)
    left = {pid for pid in pids if _alive(pid)}
    for pid in left:  # do not leave them to the rest of the suite
        os.kill(pid, signal.SIGKILL)
    return left


@pytest.mark.slow
def test_sigkill_to_train_takes_torchrun_and_the_ranks_with_it(workspace):
    root, params = workspace
    proc, children = _start_training(root, params, "killed")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    assert _all_gone(children, within=60) == set(), "processes outlived vae-pipeline train"


@pytest.mark.slow
def test_sigterm_to_train_stops_like_ctrl_c(workspace):
    root, params = workspace
    proc, children = _start_training(root, params, "terminated")
    os.kill(proc.pid, signal.SIGTERM)
    returncode = proc.wait(timeout=60)
    err = proc.stderr.read().decode()
    assert returncode == 130 and "stopped (signal 15)" in err, err[-2000:]
    assert _all_gone(children, within=30) == set()
    assert "stopped torchrun" in err  # the launcher's own cleanup ran


@pytest.mark.slow
def test_sigterm_to_retrain_leaves_no_prefect_server_torchrun_or_rank(tmp_path):
    from .conftest import make_workspace

    ws = make_workspace(tmp_path / "ws", train={"epochs": 500, "nproc_per_node": 2})
    env = {**torchrun_env(), "PREFECT_HOME": str(tmp_path / "prefect-home")}
    env.pop("PREFECT_API_URL", None)  # the ephemeral server: the one that used to be orphaned
    proc = subprocess.Popen(
        [sys.executable, "-m", "vae_pipeline.cli", "retrain"],
        cwd=ws,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 240
    children: set[int] = set()
    while time.monotonic() < deadline:
        if list((ws / "runs").glob("*/checkpoint.pt")):
            children = _descendants(proc.pid)
            break
        if proc.poll() is not None:
            pytest.fail(f"retrain ended early: {proc.stderr.read().decode()[-3000:]}")
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("retrain did not reach training within 240 s")
    assert len(children) >= 4  # the Prefect server, torchrun and two ranks at least
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=90)
    finally:
        err = proc.stderr.read().decode()
    assert proc.returncode != 0, err[-2000:]
    assert _all_gone(children, within=30) == set(), err[-2000:]
