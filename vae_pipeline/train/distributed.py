"""Rank and world size from torchrun's environment; process group set up and torn down once."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from vae_pipeline.errors import UserError

# `train.nproc_per_node: auto` on CPU: two ranks (gloo), the choice measured for the demo on
# 2-core machines; on CUDA one rank per visible GPU.
CPU_RANKS = 2


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


def wants_cuda(preference: str) -> bool:
    """Whether `train.device` (auto | cuda | cpu) asks for CUDA here."""
    return preference == "cuda" or (preference == "auto" and torch.cuda.is_available())


def ranks_per_node(nproc_per_node: int | str, preference: str = "auto") -> int:
    """`train.nproc_per_node` as a number: auto = one rank per visible GPU when training on
    CUDA (`train.device`), else CPU_RANKS."""
    if nproc_per_node != "auto":
        return int(nproc_per_node)
    if wants_cuda(preference) and torch.cuda.is_available():
        return torch.cuda.device_count()
    return CPU_RANKS


def pick_device(preference: str, local_rank: int = 0) -> torch.device:
    """The device for `train.device` (auto | cuda | cpu): the process's GPU on CUDA (set as
    the current device), else the CPU. Training, evaluation, the monitor and the model commands
    all choose here. A local rank without a GPU of its own is refused, naming the setting."""
    if wants_cuda(preference):
        if not torch.cuda.is_available():
            raise UserError("train.device=cuda but no CUDA device is visible: use auto or cpu")
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise UserError(
                f"local rank {local_rank} has no GPU: this node has {visible} visible; set "
                f"train.nproc_per_node to at most {visible} (or auto: one rank per GPU), or "
                "train.device=cpu"
            )
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


@contextlib.contextmanager
def patient_group(timeout: timedelta) -> Iterator[dist.ProcessGroup | None]:
    """A gloo group of every rank whose collectives wait up to `timeout` (the default group
    may time out sooner: NCCL's default is 10 minutes), destroyed afterwards; None when there
    is no process group. Every rank must enter it (its creation is collective)."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        yield None
        return
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        yield group
    finally:
        dist.destroy_process_group(group)


def broadcast_object(obj, group: dist.ProcessGroup | None = None):
    """Rank 0's `obj` on every rank (itself when there is no process group), over `group`
    (default: the default group)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        holder = [obj]
        dist.broadcast_object_list(holder, src=0, group=group)
        return holder[0]
    return obj
