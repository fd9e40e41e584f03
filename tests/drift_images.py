"""Images for the drift monitor's cases: Fashion-MNIST as prepare and a folder see it, drawn
digits (another domain, simpler than clothing) and inverted clothing, as 28x28 uint8 arrays."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def fashion_test_images(start: int, n: int) -> np.ndarray:
    """Fashion-MNIST test images start..start+n: (n, 28, 28) uint8."""
    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    return images[start : start + n].copy()


def drawn_digits(n: int, seed: int) -> np.ndarray:
    """Handwriting-like digits: white strokes on black, each with its own size, stroke width,
    position and slant (Pillow's bundled font, so no download): (n, 28, 28) uint8."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, 28, 28), np.uint8)
    for i in range(n):
        size = int(rng.integers(18, 27))
        font = ImageFont.load_default(size=size)
        img = Image.new("L", (28, 28), 0)
        draw = ImageDraw.Draw(img)
        digit = str(int(rng.integers(0, 10)))
        x, y = 14 + rng.normal(0, 1.5), 14 + rng.normal(0, 1.5)
        draw.text(
            (x, y),
            digit,
            fill=255,
            font=font,
            anchor="mm",
            stroke_width=int(rng.integers(1, 3)),
            stroke_fill=255,
        )
        img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.Resampling.BILINEAR)
        img = img.filter(ImageFilter.GaussianBlur(0.6))
        out[i] = np.asarray(img)
    return out


def save_pngs(images: np.ndarray, folder: Path, size: int | None = None) -> Path:
    """Each image as a PNG in `folder`; `size` pads it centred to size x size first (as
    prepare does to Fashion-MNIST's IDX images)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        if size is not None:
            pad = size - img.shape[0]
            img = np.pad(img, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2)))
        Image.fromarray(img).save(folder / f"img{i:05d}.png")
    return folder


def save_jpegs(images: np.ndarray, folder: Path, size: int = 64, quality: int = 95) -> Path:
    """Each 28x28 image upscaled to size x size (bicubic), as an RGB JPEG in `folder`: the
    same images as a source that stores larger colour files would hold them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, img in enumerate(images):
        big = Image.fromarray(img).resize((size, size), Image.Resampling.BICUBIC).convert("RGB")
        big.save(folder / f"img{i:05d}.jpg", quality=quality)
    return folder
