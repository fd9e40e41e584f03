"""Decoding real image files of every mode the sources promise, and refusing bad ones."""

import io

import numpy as np
import pytest
from PIL import Image

from vae_pipeline.data.images import (
    BadImage,
    check_image,
    decode_image,
    fit_array,
    fit_image,
    load_image,
    padded_box,
)


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_16_bit_grayscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 4096, 32768, 65535, 65280]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(load_image(path, 1))
    expected = np.round(values.astype(np.float64) / 257.0).astype(np.uint8)  # 65535 -> 255
    np.testing.assert_array_equal(got, expected)
    assert got[0, 2] == 16  # Pillow's own convert("L") would give 255 here


def test_alpha_is_composited_over_black(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[0, 0, 3] = 255  # opaque
    rgba[0, 1, 3] = 0  # fully transparent
    rgba[1, :, 3] = 128  # half
    path = _save(Image.fromarray(rgba, "RGBA"), tmp_path / "alpha.png")
    got = np.asarray(load_image(path, 3))
    assert got[0, 0].tolist() == [200, 0, 0]
    assert got[0, 1].tolist() == [0, 0, 0]
    assert abs(int(got[1, 0, 0]) - round(200 * 128 / 255)) <= 1


def test_palette_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 250, 240, 230] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    plain = _save(pal, tmp_path / "pal.png")
    assert np.asarray(load_image(plain, 3)).tolist() == [[[10, 20, 30], [250, 240, 230]]]
    see_through = _save(pal, tmp_path / "pal_t.png", transparency=1)
    assert np.asarray(load_image(see_through, 3)).tolist() == [[[10, 20, 30], [0, 0, 0]]]


@pytest.mark.parametrize("fmt,ext", [("WEBP", "webp"), ("BMP", "bmp"), ("PNG", "png")])
def test_lossless_formats_round_trip(tmp_path, fmt, ext):
    rgb = np.random.default_rng(0).integers(0, 256, (9, 7, 3), dtype=np.uint8)
    kw = {"lossless": True} if fmt == "WEBP" else {}
    path = _save(Image.fromarray(rgb), tmp_path / f"x.{ext}", format=fmt, **kw)
    np.testing.assert_array_equal(np.asarray(load_image(path, 3)), rgb)


def test_rgb_to_gray_uses_luma_and_resize_crops_the_centre(tmp_path):
    rgb = np.zeros((8, 16, 3), np.uint8)
    rgb[:, 4:12] = [255, 0, 0]  # a red centre band, black on the sides that the crop removes
    path = _save(Image.fromarray(rgb), tmp_path / "wide.png")
    gray = decode_image(path, 8, 1)
    assert gray.shape == (1, 8, 8)
    assert np.all(np.abs(gray.astype(int) - round(255 * 0.299)) <= 1)  # ITU-R 601 luma of red


def test_exif_orientation_is_applied(tmp_path):
    arr = np.zeros((2, 4), np.uint8)
    arr[0, 0] = 255
    img = Image.fromarray(arr)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to view"
    path = _save(img, tmp_path / "rot.jpg", exif=exif, quality=100)
    got = np.asarray(load_image(path, 1))
    assert got.shape == (4, 2)  # portrait after the rotation


@pytest.mark.parametrize(
    "name,content,reason",
    [
        ("empty.png", b"", "empty file"),
        ("text.jpg", b"this is not an image at all", "cannot decode"),
        ("random.webp", bytes(range(256)) * 4, "cannot decode"),
    ],
)
def test_unreadable_files_name_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(BadImage, match=reason) as info:
        check_image(path)
    assert name in str(info.value)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_files_are_refused(tmp_path, fmt):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(BadImage, match="cut"):
        check_image(path)


def test_decompression_bomb_is_refused_from_the_header(tmp_path):
    path = _save(Image.new("L", (2000, 1500)), tmp_path / "huge.png")
    assert path.stat().st_size < 50_000  # small on disk, 3 MP when decoded
    with pytest.raises(BadImage, match=r"2000x1500 = 3,000,000 pixels.*max_image_pixels"):
        check_image(path, max_pixels=1_000_000)
    check_image(path, max_pixels=3_000_000)  # at the limit: accepted


@pytest.mark.parametrize("w,h", [(40, 50), (50, 40), (32, 32), (7, 100), (250, 181), (31, 64)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_resize_and_crop_match_torchvision(w, h, mode):
    from torchvision.transforms.v2 import functional as TF

    shape = (h, w) if mode == "L" else (h, w, 3)
    img = Image.fromarray(np.random.default_rng(w * h).integers(0, 256, shape, dtype=np.uint8))
    ref = np.asarray(TF.center_crop(TF.resize(img, [32], antialias=True), [32, 32]))
    ref = ref[None] if ref.ndim == 2 else ref.transpose(2, 0, 1)
    np.testing.assert_array_equal(fit_image(img, 32), ref)


@pytest.mark.parametrize("w,h", [(28, 28), (20, 31), (32, 7), (1, 1)])
@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_images_no_larger_than_the_square_are_padded_centred_never_scaled(w, h, mode):
    shape = (h, w) if mode == "L" else (h, w, 3)
    arr = np.random.default_rng(w * h).integers(1, 256, shape, dtype=np.uint8)
    out = fit_image(Image.fromarray(arr), 32)
    top, left = (32 - h) // 2, (32 - w) // 2
    assert padded_box(w, h, 32) == [top, left, h, w]
    chw = arr[None] if mode == "L" else arr.transpose(2, 0, 1)
    np.testing.assert_array_equal(out[:, top : top + h, left : left + w], chw)
    inside = np.zeros((32, 32), bool)
    inside[top : top + h, left : left + w] = True
    assert out.shape == (chw.shape[0], 32, 32) and out[:, ~inside].max(initial=0) == 0
    np.testing.assert_array_equal(fit_array(chw, 32), out)


def test_decode_workers_start_without_torch():
    import subprocess
    import sys

    # the ingest check (images), the shard decode (shard_prepare) and the ingest's own module
    modules = "vae_pipeline.data.images, vae_pipeline.data.shard_prepare, vae_pipeline.data.sources"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
