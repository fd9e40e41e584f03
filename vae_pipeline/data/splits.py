"""Which split an image belongs to: a function of its content hash alone, so an image never
moves between splits when the dataset grows."""

from __future__ import annotations

import hashlib
import logging

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_fraction(digest: str) -> float:
    """Map a hex digest to a uniform number in [0, 1)."""
    return int(digest[:16], 16) / float(1 << 64)


def assign_split(digest: str, val_fraction: float, test_fraction: float) -> str:
    u = hash_fraction(digest)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def plan_splits(
    items: list, duplicates: list[dict], val_fraction: float, test_fraction: float
) -> tuple[dict[str, list], list[str]]:
    """Each image's split by its hash, and its label: the index of its first-level folder
    (`label_dir`, None without one) among the folder names in name order. `items` carry
    `digest`, `label_dir` and `label` (set here), in the order rows are written."""
    label_names = sorted({i.label_dir for i in items if i.label_dir is not None})
    label_of = {name: k for k, name in enumerate(label_names)}
    plan: dict[str, list] = {s: [] for s in SPLITS}
    for item in items:
        if item.label_dir is not None:
            item.label = label_of[item.label_dir]
        plan[assign_split(item.digest, val_fraction, test_fraction)].append(item)
    if duplicates:
        log.warning("%d duplicate images left out (same bytes as another file)", len(duplicates))
    return plan, label_names
