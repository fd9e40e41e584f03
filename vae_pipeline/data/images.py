"""Decoding one image file into a uint8 array of the configured size and channels.

Every mode Pillow opens is accepted: grayscale, RGB, CMYK, palette, 16-bit, and images with an
alpha channel (composited over black, the background a VAE sees in padding). JPEG EXIF
orientation is applied. An image larger than `max_pixels` is refused from its header alone,
before any pixel is decoded (the decompression-bomb guard).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from vae_pipeline.errors import UserError

# Pillow decodes each of these (a GIF's first frame; TIFF's 16-bit modes are scaled to 8 bits)
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own default limit (about 0.25 GB for 24-bit RGB)
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DECODE_ERRORS = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    Image.DecompressionBombError,
)


class BadImage(UserError):
    """An image file that cannot be decoded (corrupt, truncated, empty, too large, not an image)."""


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def utf8_name(path: Path | str) -> bool:
    """Whether the path is valid UTF-8 (a name of other bytes arrives as surrogates, which DVC,
    JSON reports and index.csv cannot store)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def list_images(folder: Path) -> list[Path]:
    """Image files below `folder`, recursively, in a stable (sorted) order; symlinks are not
    followed (a link could point anywhere on the machine), names that are not UTF-8 are left
    out (`entries.scan_folder` reports both)."""
    return sorted(
        p
        for p in folder.rglob("*")
        if is_image_name(p.name) and p.is_file() and not p.is_symlink() and utf8_name(p)
    )


def _to_8bit_mode(img: Image.Image) -> Image.Image:
    """16-bit and 32-bit integer grayscale -> L by scaling (Pillow's convert would clip at 255);
    alpha -> composited over black; everything else is left to `convert`."""
    if img.mode in _SIXTEEN_BIT:
        arr = np.asarray(img, dtype=np.int64)
        eight_bit = img.mode == "I" and arr.max(initial=0) <= 255  # 8-bit data in 32-bit ints
        scaled = arr if eight_bit else (arr + 128) // 257  # 0..65535 -> 0..255, rounded
        return Image.fromarray(np.clip(scaled, 0, 255).astype(np.uint8), mode="L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        img.mode == "P" and "transparency" in img.info
    ):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return img


@contextlib.contextmanager
def _pillow_limit_off():
    """data.max_image_pixels is the one rule: Pillow's own limit (which refuses above twice
    its 89,478,485 pixels whatever the setting) is off while a file is opened; the header check
    below refuses before any pixel is decoded."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(path: Path | str, img: Image.Image, max_pixels: int) -> None:
    width, height = img.size
    if width * height > max_pixels:
        raise BadImage(
            f"{path}: {width}x{height} = {width * height:,} pixels is over "
            f"data.max_image_pixels ({max_pixels:,}); raise it if the image is genuine"
        )


def pixel_check(path: Path | bytes, max_pixels: int, name: str = "") -> str | None:
    """The size rule alone, from the header (no decode): why the file (or the bytes of one
    named `name`) is refused, or None."""
    name = name or str(path)
    try:
        fp = io.BytesIO(path) if isinstance(path, bytes) else path
        with _pillow_limit_off(), Image.open(fp) as img:
            _check_pixels(name, img, max_pixels)
    except BadImage as exc:
        return str(exc)
    except _DECODE_ERRORS as exc:
        return f"{name}: cannot decode image ({exc})"
    return None


def load_image(path: Path, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decoded image in mode L (channels=1) or RGB (channels=3); BadImage names the file."""
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BadImage(f"{path}: cannot read ({exc.strerror})") from exc
    return _load(path, str(path), size, channels, max_pixels)


def load_image_bytes(
    data: bytes, name: str, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> Image.Image:
    """`load_image` of a file's bytes (an image inside a shard); BadImage names it `name`."""
    return _load(io.BytesIO(data), name, len(data), channels, max_pixels)


def _load(fp, name: str, size: int, channels: int, max_pixels: int) -> Image.Image:
    if size == 0:
        raise BadImage(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings(), _pillow_limit_off():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fp) as img:
                _check_pixels(name, img, max_pixels)
                img.load()  # a full decode: truncated and corrupt files fail here, not later
                img = ImageOps.exif_transpose(img)
                img = _to_8bit_mode(img)
                return img.convert("L" if channels == 1 else "RGB")
    except BadImage:
        raise
    except _DECODE_ERRORS as exc:
        reason = str(exc).replace(repr(fp), repr(name))  # Pillow names a file object by repr
        raise BadImage(f"{name}: cannot decode image ({reason})") from exc


def padded_box(width: int, height: int, image_size: int) -> list[int] | None:
    """Where a width x height image sits in the image_size square when `fit_image` pads it:
    [top, left, height, width]; None when it fills the square (scaled, or already that size)."""
    if width > image_size or height > image_size or (width, height) == (image_size,) * 2:
        return None
    return [(image_size - height) // 2, (image_size - width) // 2, height, width]


def fit_array(arr: np.ndarray, image_size: int) -> np.ndarray:
    """The one rule that makes every image image_size x image_size, whatever its source (a
    folder, an archive, s3://, IDX files, the monitor's new images), on (C, H, W) uint8:

    - no side larger than image_size: centred on a black square, never scaled (Fashion-MNIST's
      28 x 28 sits in 32 x 32 with 2 black pixels on each side, the same tensor whether it came
      from the IDX files or a PNG);
    - otherwise: the shorter side is resized to image_size (bilinear with antialiasing) and the
      centre is cropped.
    """
    _, height, width = arr.shape
    if width <= image_size and height <= image_size:
        if (width, height) == (image_size, image_size):
            return np.ascontiguousarray(arr)
        top, left, _, _ = padded_box(width, height, image_size)
        out = np.zeros((arr.shape[0], image_size, image_size), np.uint8)
        out[:, top : top + height, left : left + width] = arr
        return out
    mode = "L" if arr.shape[0] == 1 else "RGB"
    img = Image.fromarray(arr[0] if mode == "L" else arr.transpose(1, 2, 0), mode=mode)
    return resize_and_crop(img, image_size)


def resize_and_crop(img: Image.Image, image_size: int) -> np.ndarray:
    """Resize the shorter side to `image_size` and centre-crop: (C, H, W) uint8.

    The same arithmetic and filter as torchvision's `resize(img, [size])` + `center_crop` on a
    PIL image (bilinear with Pillow's antialiasing; a test checks the two agree), without
    importing torch, so decode workers start in a fraction of a second.
    """
    width, height = img.size
    short, long = (width, height) if width <= height else (height, width)
    if short != image_size:
        new_long = int(image_size * long / short)
        size = (image_size, new_long) if width <= height else (new_long, image_size)
        img = img.resize(size, Image.Resampling.BILINEAR)
        width, height = img.size
    left = int(round((width - image_size) / 2.0))
    top = int(round((height - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    return _chw(img)


def _chw(img: Image.Image) -> np.ndarray:
    arr = np.asarray(img, dtype=np.uint8)
    arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
    return np.ascontiguousarray(arr)


def fit_image(img: Image.Image, image_size: int) -> np.ndarray:
    """`fit_array`'s rule on a decoded image: (C, H, W) uint8."""
    width, height = img.size
    if width > image_size or height > image_size:
        return resize_and_crop(img, image_size)
    return fit_array(_chw(img), image_size)


def fit_into_box(img: Image.Image, image_size: int, box: list[int] | None) -> np.ndarray:
    """Fit a decoded image the way a padded training set was fitted: (C, H, W) uint8.

    `box` is that data's content box ([top, left, height, width] of its real pixels inside the
    image_size square, as manifest.json and the model's hparams record it). An image larger
    than the image_size square (either side) is resized into the box by `fit_image`'s rule (shorter side to the
    box, centre crop) and placed at the box inside a black frame, so a 64x64 or 56x56 copy of
    a 28x28 training image gives (nearly) the tensor prepare made of it. An image that fits the
    image_size square (a 28x28 one, or one already padded to 32x32), or no box, is `fit_image`
    itself, exactly as prepare fitted it."""
    width, height = img.size
    if box is None:
        return fit_image(img, image_size)
    top, left, box_h, box_w = (int(v) for v in box)
    if width <= image_size and height <= image_size:  # within the frame: prepare's rule
        return fit_image(img, image_size)
    if box_h == box_w:
        inner = resize_and_crop(img, box_h)
    else:  # cover the box (the shorter side's rule, per axis), then crop its centre
        scale = max(box_h / height, box_w / width)
        size = (max(box_w, int(width * scale)), max(box_h, int(height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR) if size != img.size else img
        x0, y0 = int(round((size[0] - box_w) / 2.0)), int(round((size[1] - box_h) / 2.0))
        inner = _chw(img.crop((x0, y0, x0 + box_w, y0 + box_h)))
    out = np.zeros((inner.shape[0], image_size, image_size), np.uint8)
    out[:, top : top + box_h, left : left + box_w] = inner
    return out


def describe_fitting(image_size: int, box: list[int] | None) -> str:
    """How `fit_into_box` fits images for `box`, in words (for reports)."""
    if box is None:
        return (
            f"to {image_size}x{image_size}: padded when no side is larger, else resized and "
            "centre-cropped (no content box)"
        )
    return (
        f"into content box {list(box)} (top, left, height, width) of {image_size}x{image_size}: "
        f"an image larger than {box[2]}x{box[3]} is resized and cropped into it, black around"
    )


def decode_image(
    path: Path, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Decode, convert to L or RGB and fit to image_size (`fit_array`): (C, H, W) uint8."""
    return fit_image(load_image(path, channels, max_pixels), image_size)


def decode_sized(
    path: Path, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_image` and the image's own (width, height) before fitting."""
    img = load_image(path, channels, max_pixels)
    return fit_image(img, image_size), img.size


def check_image(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Raise BadImage unless `path` decodes in full (used at ingest, before anything is stored)."""
    load_image(path, 3, max_pixels)


def check_worker(args: tuple[str, int]) -> str | None:
    """Pool worker for ingest: None, or why the file cannot be used."""
    path, max_pixels = args
    try:
        check_image(Path(path), max_pixels)
    except BadImage as exc:
        return str(exc)
    return None


def decode_worker(
    args: tuple[str, int, int, int],
) -> tuple[np.ndarray, tuple[int, int]] | str:
    """Pool worker for prepare: the fitted (C, H, W) uint8 image and its own (width, height),
    or why it cannot be used."""
    path, size, channels, max_pixels = args
    try:
        return decode_sized(Path(path), size, channels, max_pixels)
    except BadImage as exc:
        return str(exc)


def ingest_worker(args: tuple[str, int]) -> tuple[bytes | None, str, str | None]:
    """Pool worker for a sharded ingest: the file's bytes, their sha256, and None; or (None,
    "", why the file cannot be used). Read once: the bytes are checked, hashed and returned."""
    path, max_pixels = args
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return None, "", f"{path}: cannot read ({exc.strerror})"
    try:
        load_image_bytes(data, path, 3, max_pixels)
    except BadImage as exc:
        return None, "", str(exc)
    return data, hashlib.sha256(data).hexdigest(), None


def decode_bytes(
    data: bytes, name: str, image_size: int, channels: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """`decode_sized` of a file's bytes."""
    img = load_image_bytes(data, name, channels, max_pixels)
    return fit_image(img, image_size), img.size
