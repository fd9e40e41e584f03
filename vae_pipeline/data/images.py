"""Decoding one image file into a uint8 array of the configured size and channels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2 import functional as TF

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp"})


class BadImage(ValueError):
    """An image file that cannot be decoded (corrupt, truncated, empty, or not an image)."""


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, in a stable (sorted) order."""
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def decode_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """Decode, convert to L or RGB, resize the shorter side and centre-crop: (C, H, W) uint8."""
    if path.stat().st_size == 0:
        raise BadImage(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()  # forces a full decode: truncated files fail here, not later
            img = img.convert("L" if channels == 1 else "RGB")
    except (
        UnidentifiedImageError,
        OSError,
        SyntaxError,
        ValueError,
        Image.DecompressionBombError,
    ) as exc:
        raise BadImage(f"{path}: cannot decode image ({exc})") from exc
    img = TF.resize(img, [image_size], antialias=True)
    img = TF.center_crop(img, [image_size, image_size])
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)
