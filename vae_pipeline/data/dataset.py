"""A torch Dataset over one prepared split, memory-mapped (pages are read on demand)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from vae_pipeline.data.errors import DataError


def read_manifest(prepared_dir: Path) -> dict:
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise DataError(f"no prepared data in {prepared_dir}: run `vae-pipeline prepare` first")
    return json.loads(path.read_text())


class PreparedSplit(Dataset):
    """Items are (uint8 image (C, H, W), label); scale with `to_unit_float` on the device."""

    def __init__(self, prepared_dir: Path, split: str):
        prepared_dir = Path(prepared_dir)
        self.manifest = read_manifest(prepared_dir)
        path = prepared_dir / f"{split}_images.npy"
        if not path.is_file():
            raise DataError(f"prepared split {path} is missing: run `vae-pipeline prepare` again")
        self.images = np.load(path, mmap_mode="r")
        self.labels = np.load(prepared_dir / f"{split}_labels.npy")
        self.split = split

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.from_numpy(np.array(self.images[index])), int(self.labels[index])

    def tensor(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A contiguous slice as one uint8 tensor (evaluation reads in large blocks)."""
        return torch.from_numpy(np.array(self.images[start:stop]))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]: the Bernoulli likelihood's targets."""
    return images.float().div_(255.0)
