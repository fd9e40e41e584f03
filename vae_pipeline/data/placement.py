"""Whether a prepared split is kept on the device (`train.resident_data`): the budget rule
shared by training, validation and evaluation."""

from __future__ import annotations

import os

import numpy as np
import torch

from vae_pipeline.data.dataset import PreparedSplit

# `train.resident_data: auto` keeps a split on the device when it takes at most this share of
# the device's memory (a CUDA card's total memory; on CPU, this process's share of the RAM).
RESIDENT_SHARE = 0.25


def split_bytes(split: PreparedSplit) -> int:
    """Bytes of the split's kept images as uint8."""
    return len(split) * int(np.prod(split.images.shape[1:]))


def device_memory(device: torch.device, local_world_size: int = 1) -> int:
    """Memory a rank may count on: the card's total memory on CUDA; on CPU the machine's
    physical RAM divided among the ranks on this node (each rank holds its own copy)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // max(1, local_world_size)


def resident_decision(
    setting: bool | str, need: int, device: torch.device, local_world_size: int = 1
) -> tuple[bool, str]:
    """Whether to keep the training (and validation) split on the device, and why."""
    mib = need / 2**20
    if setting is True:
        return True, f"train.resident_data=true ({mib:.0f} MiB)"
    if setting is False:
        return False, "train.resident_data=false"
    budget = RESIDENT_SHARE * device_memory(device, local_world_size)
    if need <= budget:
        return True, f"{mib:.0f} MiB fits {RESIDENT_SHARE:.0%} of the {device.type} memory"
    return False, (
        f"{mib:.0f} MiB is over {RESIDENT_SHARE:.0%} of the {device.type} memory "
        f"({budget / 2**20:.0f} MiB); set train.resident_data=true to force it"
    )
