"""The training data path: each step's batch of uint8 images, in the sampler's order, on the
device, and the images' positions in their split (they key dynamic binarization).

Two paths, the same batches (the same positions, the same bytes, so the same trajectory):
- resident: the whole split is copied to the device once, as uint8, and a batch is one gather
  (`index_select`) there: no loader, no host-to-device copy per step. Used when the split fits
  `train.resident_data`'s budget (`resident_budget`).
- loader: a DataLoader whose items are whole batches (one fancy-indexed read of the memory-
  mapped split per batch, not one per image), with `train.num_workers` worker processes,
  pinned memory and prefetching on CUDA, so the copy overlaps the previous step.
uint8 -> float happens on the device in both (`to_unit_float`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from vae_pipeline.config import Config
from vae_pipeline.config.sections import TrainConfig
from vae_pipeline.data.dataset import PreparedSplit, read_manifest, resolve_label
from vae_pipeline.data.placement import resident_decision, split_bytes

__all__ = ["DeviceSplit", "StepBatches", "loader_workers", "resident_decision", "split_bytes"]

log = logging.getLogger(__name__)

# `train.num_workers: auto` on CUDA: loader processes per rank (a bare DataLoader with 4 workers
# and pinned memory delivered 10.5k images/s at 3x250x250 on an H100 host, above the step).
CUDA_WORKERS = 4


def loader_workers(tc: TrainConfig, device: torch.device, local_world_size: int = 1) -> int:
    """`train.num_workers`, with auto = 0 on CPU (the ranks use the cores; a memory-mapped
    gather is cheap) and up to CUDA_WORKERS per rank on CUDA, within the CPU count."""
    if tc.num_workers != "auto":
        return int(tc.num_workers)
    if device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(0, min(CUDA_WORKERS, (cpus or 1) // max(1, local_world_size) - 1))


class DeviceSplit:
    """A prepared split held on the device as one uint8 tensor (N, C, H, W)."""

    def __init__(self, split: PreparedSplit, device: torch.device):
        self.images = split.tensor().to(device).contiguous()
        self.device = device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, positions: torch.Tensor) -> torch.Tensor:
        if positions.device != self.device:  # the resident path's are there already
            positions = positions.to(self.device)
        return self.images.index_select(0, positions)


class _OrderedBatches(Dataset):
    """Item i = the batch of step `start + i` of one epoch: (uint8 images, positions)."""

    def __init__(self, split: PreparedSplit, order: torch.Tensor, batch: int, start: int):
        self.split, self.order, self.batch, self.start = split, order, batch, start
        self.steps = len(order) // batch

    def __len__(self) -> int:
        return self.steps - self.start

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        step = self.start + i
        positions = self.order[step * self.batch : (step + 1) * self.batch]
        return self.split.take(positions.numpy()), positions


class StepBatches:
    """This rank's batches of one split, step by step, on the device, in `order`."""

    def __init__(
        self,
        split: PreparedSplit,
        device: torch.device,
        resident: bool,
        num_workers: int = 0,
    ):
        self.split, self.device = split, device
        self.resident = DeviceSplit(split, device) if resident else None
        self.num_workers = num_workers

    def describe(self) -> str:
        if self.resident is not None:
            return (
                f"resident on {self.device} ({self.resident.images.nbytes / 2**20:.0f} MiB uint8)"
            )
        pinned = ", pinned" if self.device.type == "cuda" else ""
        return f"loader ({self.num_workers} workers{pinned})"

    def epoch(
        self, order: torch.Tensor, batch: int, start: int = 0
    ) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """(step, uint8 images on the device, positions on the device) for steps start.. of
        an epoch whose per-rank order of positions is `order`."""
        steps = len(order) // batch
        if self.resident is not None:
            order = order.to(self.device)
            for step in range(start, steps):
                positions = order[step * batch : (step + 1) * batch]
                yield step, self.resident.batch(positions), positions
            return
        cuda = self.device.type == "cuda"
        loader = DataLoader(
            _OrderedBatches(self.split, order, batch, start),
            batch_size=None,  # items are whole batches already
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=cuda,
            prefetch_factor=4 if self.num_workers else None,
            # workers start from a clean server process, not a fork of this one (which may
            # hold threads: Prefect's, MLflow's, NCCL's); the split travels by path
            multiprocessing_context="forkserver" if self.num_workers else None,
        )
        for step, (images, positions) in enumerate(loader, start=start):
            yield (
                step,
                images.to(self.device, non_blocking=cuda),
                positions.to(self.device, non_blocking=cuda),
            )


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose whole per-rank order of an epoch can be read at once: a
    function of (seed, epoch), and rank r's share of global batch s is the same for any world
    size. A resumed epoch starts part-way into this order (train/data.py)."""

    def order(self) -> list[int]:
        """This rank's whole order for the current epoch."""
        return list(super().__iter__())


def holdout_label(cfg: Config, prepared_dir: Path) -> int | None:
    """The label index of anomaly.holdout_class in the prepared data (None: no held-out class)."""
    names = read_manifest(prepared_dir).get("label_names") or []
    return resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")


@dataclass
class TrainingData:
    """A rank's data path: the sampler's order, the step batches, the validation split on the
    device when resident (else None), and why it is resident or not (for the log)."""

    sampler: ResumableSampler
    batches: StepBatches
    val_data: DeviceSplit | None
    reason: str


def training_data(
    cfg: Config, env, device: torch.device, train_set: PreparedSplit, val_set: PreparedSplit
) -> TrainingData:
    """The splits on the device when they fit (one gather per step), else a batch-wise loader;
    the same batches either way."""
    tc = cfg.train
    sampler = ResumableSampler(
        train_set,
        num_replicas=env.world_size,
        rank=env.rank,
        shuffle=True,
        seed=tc.seed,
        drop_last=True,
    )
    need = split_bytes(train_set) + split_bytes(val_set)
    resident, reason = resident_decision(tc.resident_data, need, device, env.local_world_size)
    workers = loader_workers(tc, device, env.local_world_size)
    batches = StepBatches(train_set, device, resident, workers)
    return TrainingData(
        sampler, batches, DeviceSplit(val_set, device) if resident else None, reason
    )
