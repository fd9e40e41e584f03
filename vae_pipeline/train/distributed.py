"""Rank and world size from torchrun's environment; process group set up and torn down once."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1  # ranks on this node (they share its CPU, RAM and cards)

    @property
    def is_main(self) -> bool:
        """Global rank 0: the one process that logs, checkpoints and talks to MLflow."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def read_env() -> DistEnv:
    return DistEnv(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
    )


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device for `train.device` (auto | cuda | cpu): the process's GPU on CUDA (set as
    the current device), else the CPU. Training, evaluation, the monitor and the model commands
    all choose here."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible: use auto or cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def setup(preference: str = "auto") -> tuple[DistEnv, torch.device]:
    """Join the process group when started by torchrun (RANK set): NCCL on CUDA, gloo on CPU."""
    env = read_env()
    device = pick_device(preference, env.local_rank)
    if "RANK" in os.environ and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend=backend, device_id=device if device.type == "cuda" else None
        )
    return env, device


def teardown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (itself when there is no process group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]
    return obj
