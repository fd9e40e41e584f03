"""Ranks and devices: `train.nproc_per_node: auto`, a rank without a GPU refused in one line,
the plan's wait that outlasts the default group's timeout, CUDA RNG states on fewer GPUs."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_pipeline.errors import UserError
from vae_pipeline.train import distributed
from vae_pipeline.train.distributed import CPU_RANKS, pick_device, ranks_per_node
from vae_pipeline.train.launch import torchrun_env
from vae_pipeline.train.resume import EpochProgress, set_rng_states

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def _gpus(monkeypatch, count: int) -> list[int]:
    """A host with `count` GPUs, as torch.cuda reports them (this machine has none)."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_auto_is_one_rank_per_gpu_on_cuda_and_two_on_cpu(monkeypatch):
    assert ranks_per_node("auto", "cpu") == CPU_RANKS == 2
    assert ranks_per_node(3, "auto") == 3
    _gpus(monkeypatch, 1)
    assert ranks_per_node("auto", "auto") == 1  # the one-GPU host: one rank, not two
    assert ranks_per_node("auto", "cpu") == CPU_RANKS  # device forced to CPU
    _gpus(monkeypatch, 8)
    assert ranks_per_node("auto", "cuda") == 8


def test_a_local_rank_without_a_gpu_is_refused_naming_the_setting(monkeypatch):
    chosen = _gpus(monkeypatch, 1)
    assert pick_device("auto", 0) == torch.device("cuda", 0) and chosen == [0]
    with pytest.raises(UserError, match=r"local rank 1 has no GPU.*train.nproc_per_node"):
        pick_device("auto", 1)
    assert chosen == [0]  # set_device(1) never called: no "invalid device ordinal"


PLAN_WAIT_SCRIPT = """
import sys, time
from datetime import timedelta
import torch.distributed as dist
from vae_pipeline.train.distributed import broadcast_object, patient_group
dist.init_process_group("gloo", timeout=timedelta(seconds=3))
patient = sys.argv[1] == "patient"
with patient_group(timedelta(seconds=60)) as group:
    if dist.get_rank() == 0:
        time.sleep(8)  # a cold probe, longer than the default group's timeout
    plan = broadcast_object("plan" if dist.get_rank() == 0 else None, group if patient else None)
assert plan == "plan", plan
dist.destroy_process_group()
"""


def test_the_other_ranks_wait_for_a_slow_probe_past_the_group_timeout(tmp_path):
    script = tmp_path / "plan_wait.py"
    script.write_text(PLAN_WAIT_SCRIPT)
    env = torchrun_env()
    env["PYTHONPATH"] = str(Path(distributed.__file__).parents[2])
    run = [*TORCHRUN, str(script)]
    patient = subprocess.run([*run, "patient"], capture_output=True, text=True, env=env)
    assert patient.returncode == 0, patient.stderr[-2000:]
    # the control: over the default group (3 s) the waiting rank gives up
    hasty = subprocess.run([*run, "default"], capture_output=True, text=True, env=env)
    assert hasty.returncode != 0


def test_cuda_rng_states_of_more_gpus_than_the_host_has_are_not_forced_on_it(monkeypatch, caplog):
    _gpus(monkeypatch, 1)
    restored = []
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: restored.append(i))
    state = {
        "torch": torch.get_rng_state(),
        "cuda": [torch.zeros(16, dtype=torch.uint8)] * 2,  # written on a 2-GPU host
        "numpy": [
            "MT19937",
            torch.zeros(624, dtype=torch.int64),
            624,
            0,
            0.0,
        ],
        "python": (3, tuple(range(625)), None),
    }
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        set_rng_states(state)
    assert restored == [0]  # not index 1: "invalid device ordinal" before
    assert "CUDA RNG states of 2 GPUs, this host has 1" in caplog.text


def test_a_mid_epoch_noise_state_from_another_device_type_is_not_forced(caplog):
    noise = torch.Generator().manual_seed(1)
    resume = {
        "noise": torch.zeros(16, dtype=torch.uint8),  # a CUDA generator's state
        "noise_device": "cuda",
        "skipped": 0,
        "seconds": 0.0,
        "sums": torch.zeros(4, dtype=torch.float64),
        "count": 0.0,
    }
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        EpochProgress.begin({}, noise, torch.device("cpu"), resume, True)
    assert "noise generator was on cuda" in caplog.text
