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


def resolve_label(holdout: str | None, label_names: list[str], field: str) -> int | None:
    """The label index that `holdout` (a label name, any case, or an index) names; None for None.

    Raises DataError naming `field` and the labels there are when it names none of them."""
    if holdout is None:
        return None
    if not label_names:
        raise DataError(
            f"{field}={holdout!r}, but the prepared data has no labels (a folder source carries "
            f"them as sub-folder names); set {field}=null"
        )
    lowered = [name.lower() for name in label_names]
    if holdout.lower() in lowered:
        return lowered.index(holdout.lower())
    if holdout.isdigit() and int(holdout) < len(label_names):
        return int(holdout)
    listed = ", ".join(f"{k}={name}" for k, name in enumerate(label_names))
    raise DataError(f"{field}={holdout!r} is not a label of the prepared data ({listed})")


class PreparedSplit(Dataset):
    """Items are (uint8 image (C, H, W), label); scale with `to_unit_float` on the device.

    `exclude_label` leaves that label's images out (the anomaly benchmark's held-out class):
    positions then count the kept images only, and `rows` maps them to the file's rows.
    """

    def __init__(self, prepared_dir: Path, split: str, exclude_label: int | None = None):
        prepared_dir = Path(prepared_dir)
        self.manifest = read_manifest(prepared_dir)
        path = prepared_dir / f"{split}_images.npy"
        if not path.is_file():
            raise DataError(f"prepared split {path} is missing: run `vae-pipeline prepare` again")
        self.images = np.load(path, mmap_mode="r")
        self.path = path
        labels = np.load(prepared_dir / f"{split}_labels.npy")
        self.split = split
        self.rows: np.ndarray | None = None
        if exclude_label is not None:
            self.rows = np.flatnonzero(labels != exclude_label)
            labels = labels[self.rows]
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        # pickled by path (to loader workers started by forkserver or spawn), not by content:
        # the memory map is opened again on the other side
        return {k: v for k, v in self.__dict__.items() if k != "images"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.images = np.load(self.path, mmap_mode="r")

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        row = index if self.rows is None else int(self.rows[index])
        return torch.from_numpy(np.array(self.images[row])), int(self.labels[index])

    def take(self, positions: np.ndarray) -> torch.Tensor:
        """The images at these positions (of the kept images) as one uint8 tensor."""
        positions = np.asarray(positions)
        rows = positions if self.rows is None else self.rows[positions]
        return torch.from_numpy(np.array(self.images[rows]))

    def tensor(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """A contiguous slice as one uint8 tensor (evaluation reads in large blocks)."""
        if self.rows is not None:
            return self.take(np.arange(len(self))[start:stop])
        return torch.from_numpy(np.array(self.images[start:stop]))


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [0, 1]: the Bernoulli likelihood's targets."""
    return images.float().div_(255.0)
