"""Which split an image belongs to: a function of its content hash alone, so an image never
moves between splits when the dataset grows."""

from __future__ import annotations

import hashlib

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
