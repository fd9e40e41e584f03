"""Sources, prepare and the memory-mapped dataset, on real Fashion-MNIST and real image files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vae_pipeline.config import build_config
from vae_pipeline.data import DataError, PreparedSplit, prepare, snapshot_source
from vae_pipeline.data.prepare import assign_split, content_hash

from ..conftest import tiny_params


def _folder(tmp_path, n=24):
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    for i in range(n):
        label = "cats" if i % 2 else "dogs"
        (src / label).mkdir(parents=True, exist_ok=True)
        arr = rng.integers(0, 256, size=(40 + i, 50, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / label / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return src


def _cfg(source, **data):
    params = tiny_params()
    params["data"].update(source=str(source), test_fraction=0.3, val_fraction=0.2, **data)
    return build_config(params)


def test_fashion_mnist_is_padded_to_32_and_keeps_official_test_split(tmp_path, tiny_cfg):
    snapshot_source(tiny_cfg, tmp_path)
    manifest = prepare(tiny_cfg, tmp_path, data_version="v1")
    assert manifest["counts"] == {"train": 256, "val": 256, "test": 256}
    assert manifest["data_version"] == "v1"
    assert "T-shirt/top" in manifest["label_names"]
    test = PreparedSplit(tmp_path / "data/prepared", "test")
    image, label = test[0]
    assert image.shape == (1, 32, 32) and image.dtype == torch.uint8
    assert 0 <= label < 10
    assert test.images[:, :, :2, :].max() == 0 and test.images[:, :, :, -2:].max() == 0  # padding
    assert isinstance(test.images, np.memmap)


def test_splits_are_a_function_of_content(tmp_path):
    src = _folder(tmp_path)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    prepare(cfg, tmp_path)
    index = (tmp_path / "data/prepared/index.csv").read_text().splitlines()[1:]
    for line in index:
        split, _, source, digest, _ = line.split(",")
        assert split == assign_split(digest, 0.2, 0.3)
        assert digest == content_hash((src / source).read_bytes())
    assert {line.split(",")[0] for line in index} == {"train", "val", "test"}


def test_folder_labels_come_from_subfolders(tmp_path):
    cfg = _cfg(_folder(tmp_path))
    snapshot_source(cfg, tmp_path)
    manifest = prepare(cfg, tmp_path)
    assert manifest["label_names"] == ["cats", "dogs"]
    train = PreparedSplit(tmp_path / "data/prepared", "train")
    assert set(train.labels.tolist()) <= {0, 1}
    assert train.images.shape[1:] == (1, 32, 32)


def _add_bad_files(src):
    (src / "dogs" / "empty.png").write_bytes(b"")
    (src / "dogs" / "notes.jpg").write_text("not an image")
    good = (src / "cats" / "img1.png").read_bytes()
    (src / "cats" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_images_are_skipped_and_reported_by_path(tmp_path):
    src = _folder(tmp_path)
    _add_bad_files(src)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    manifest = prepare(cfg, tmp_path)
    assert sorted(manifest["bad_images"]) == [
        "cats/truncated.png",
        "dogs/empty.png",
        "dogs/notes.jpg",
    ]
    assert sum(manifest["counts"].values()) == 24


def test_bad_image_with_fail_policy_stops_before_writing(tmp_path):
    src = _folder(tmp_path)
    cfg_ok = _cfg(src)
    snapshot_source(cfg_ok, tmp_path)
    before = prepare(cfg_ok, tmp_path)
    _add_bad_files(src)
    cfg = _cfg(src, on_bad_image="fail")
    snapshot_source(cfg, tmp_path)
    with pytest.raises(DataError, match=r"(empty|notes|truncated)\.(png|jpg)"):
        prepare(cfg, tmp_path)
    # the earlier prepared data is untouched
    after = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert after == before


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    params = tiny_params()
    params["data"]["fashion_mnist_dir"] = str(tmp_path / "nowhere")
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        snapshot_source(build_config(params), tmp_path)


def test_missing_source_folder_names_it(tmp_path):
    with pytest.raises(DataError, match="no-such-folder"):
        snapshot_source(_cfg(tmp_path / "no-such-folder"), tmp_path)


def test_empty_source_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        snapshot_source(_cfg(tmp_path / "empty"), tmp_path)


def test_failed_snapshot_keeps_the_previous_one(tmp_path, tiny_cfg):
    snapshot_source(tiny_cfg, tmp_path)
    raw = tmp_path / "data/raw/FashionMNIST/raw"
    before = sorted(p.name for p in raw.iterdir())
    with pytest.raises(DataError):
        snapshot_source(_cfg(tmp_path / "missing"), tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == before
