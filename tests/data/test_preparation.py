"""Sources, prepare and the memory-mapped dataset, on real Fashion-MNIST and real image files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.preparation import assign_split, content_hash, prepare
from vae_pipeline.data.sources import snapshot_source

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


def _add_bad_files(images):
    (images / "dogs" / "empty.png").write_bytes(b"")
    (images / "dogs" / "notes.jpg").write_text("not an image")
    good = (images / "cats" / "img1.png").read_bytes()
    (images / "cats" / "truncated.png").write_bytes(good[: len(good) // 2])


def test_bad_images_in_the_raw_area_are_skipped_and_reported_by_path(tmp_path):
    # ingest keeps bad files out of a snapshot; prepare still copes with a raw area that was
    # edited by hand or written by an older version
    src = _folder(tmp_path)
    cfg = _cfg(src, layout="files")
    snapshot_source(cfg, tmp_path)
    _add_bad_files(tmp_path / "data/raw/images")
    manifest = prepare(cfg, tmp_path)
    assert sorted(manifest["bad_images"]) == [
        "cats/truncated.png",
        "dogs/empty.png",
        "dogs/notes.jpg",
    ]
    assert sum(manifest["counts"].values()) == 24


def test_bad_image_with_fail_policy_stops_before_writing(tmp_path):
    src = _folder(tmp_path)
    cfg_ok = _cfg(src, layout="files")
    snapshot_source(cfg_ok, tmp_path)
    before = prepare(cfg_ok, tmp_path)
    _add_bad_files(tmp_path / "data/raw/images")
    with pytest.raises(DataError, match=r"(empty|notes|truncated)\.(png|jpg)"):
        prepare(_cfg(src, on_bad_image="fail", layout="files"), tmp_path)
    # the earlier prepared data is untouched
    after = json.loads((tmp_path / "data/prepared/manifest.json").read_text())
    assert after == before
    assert not (tmp_path / "data/prepared.staging").exists()


def test_duplicates_are_kept_once_and_listed(tmp_path):
    src = _folder(tmp_path)
    (src / "dogs" / "copy_of_img1.png").write_bytes((src / "cats" / "img1.png").read_bytes())
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    manifest = prepare(cfg, tmp_path)
    assert manifest["duplicates"] == [
        {"path": "dogs/copy_of_img1.png", "duplicate_of": "cats/img1.png"}
    ]
    assert sum(manifest["counts"].values()) == 24
    digests = [
        line.split(",")[3]
        for line in (tmp_path / "data/prepared/index.csv").read_text().splitlines()[1:]
    ]
    assert len(digests) == len(set(digests)) == 24


def test_growing_dataset_keeps_old_test_set_inside_the_new_one(tmp_path):
    src = _folder(tmp_path, n=40)
    cfg = _cfg(src)
    snapshot_source(cfg, tmp_path)
    prepare(cfg, tmp_path)

    def splits():
        rows = (tmp_path / "data/prepared/index.csv").read_text().splitlines()[1:]
        return {line.split(",")[3]: line.split(",")[0] for line in rows}

    old = splits()
    rng = np.random.default_rng(7)
    for i in range(40):
        arr = rng.integers(0, 256, size=(30, 30, 3), dtype=np.uint8)
        Image.fromarray(arr).save(src / "cats" / f"new{i}.png")
    snapshot_source(cfg, tmp_path)
    new_manifest = prepare(cfg, tmp_path)
    new = splits()
    assert sum(new_manifest["counts"].values()) == 80
    assert all(new[digest] == split for digest, split in old.items())  # nothing moved
    old_test = {d for d, s in old.items() if s == "test"}
    assert old_test and old_test <= {d for d, s in new.items() if s == "test"}


def test_prepare_in_worker_processes_matches_in_process(tmp_path, pools):
    src = _folder(tmp_path, n=100)  # above the (patched) pool threshold
    arrays = {}
    for workers in (1, 2):
        ws = tmp_path / f"ws{workers}"
        cfg = _cfg(src, decode_workers=workers, image_size=16, channels=3, shard_bytes=8192)
        snapshot_source(cfg, ws)
        prepare(cfg, ws)
        arrays[workers] = [
            PreparedSplit(ws / "data/prepared", s).tensor().numpy()
            for s in ("train", "val", "test")
        ]
    for a, b in zip(arrays[1], arrays[2], strict=True):
        assert a.shape[1:] == (3, 16, 16)
        np.testing.assert_array_equal(a, b)
    assert pools == [2, 2]  # the 2-worker ingest and prepare ran in pools; 1 worker did not


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


def test_fashion_mnist_validation_images_are_chosen_by_content_not_position(tmp_path, tiny_cfg):
    import csv
    import gzip

    from vae_pipeline.data.preparation import hash_fraction

    from ..conftest import FASHION_MNIST_DIR

    snapshot_source(tiny_cfg, tmp_path)
    prepare(tiny_cfg, tmp_path)
    with gzip.open(FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz") as fh:
        raw = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    # the first 256 training images (in file order) whose bytes hash below val_fraction
    expected = []
    for i, image in enumerate(raw):
        if hash_fraction(content_hash(image.tobytes())) < tiny_cfg.data.val_fraction:
            expected.append(f"train[{i}]")
            if len(expected) == 256:
                break
    with open(tmp_path / "data/prepared/index.csv") as fh:
        got = [row["source"] for row in csv.DictReader(fh) if row["split"] == "val"]
    assert got == expected
    # and an image's split does not depend on where it sits: the same bytes, the same split
    assert assign_split(content_hash(raw[int(expected[0][6:-1])].tobytes()), 0.1, 0.0) == "val"


@pytest.mark.parametrize("size", [32, 16])
def test_a_28x28_image_is_the_same_tensor_from_idx_files_a_folder_and_the_monitor(tmp_path, size):
    """One fitting rule for every source: Fashion-MNIST's IDX path and a folder of the same
    images as PNG files give equal prepared tensors (padded at 32, scaled at 16), and the
    folder's manifest records the same content box."""
    from tests.drift_images import fashion_test_images, save_pngs
    from vae_pipeline.monitor.check import load_images

    idx_cfg = build_config(tiny_params(data={"limit": 300, "image_size": size}))
    snapshot_source(idx_cfg, tmp_path / "idx")
    idx_manifest = prepare(idx_cfg, tmp_path / "idx")
    idx_test = np.load(tmp_path / "idx/data/prepared/test_images.npy")

    folder = save_pngs(fashion_test_images(0, 300), tmp_path / "pngs")  # img00007.png = t10k[7]
    cfg = _cfg(folder, image_size=size, limit=None)
    snapshot_source(cfg, tmp_path / "folder")
    manifest = prepare(cfg, tmp_path / "folder")
    assert manifest["content_box"] == idx_manifest["content_box"]
    assert manifest["content_box"] == ([2, 2, 28, 28] if size == 32 else None)
    index = (tmp_path / "folder/data/prepared/index.csv").read_text().splitlines()[1:]
    compared = 0
    for split in ("train", "val", "test"):
        images = np.load(tmp_path / f"folder/data/prepared/{split}_images.npy")
        for line in (ln for ln in index if ln.startswith(split + ",")):
            _, row, source, _, _ = line.split(",")
            t10k = int(source.removeprefix("img").removesuffix(".png"))
            np.testing.assert_array_equal(images[int(row)], idx_test[t10k], err_msg=source)
            compared += 1
    assert compared == 300

    names, monitored = load_images(cfg, folder, sorted(folder.glob("*.png"))[:50], 50, 0)
    assert names[0] == "img00000.png"
    np.testing.assert_array_equal(monitored.numpy(), idx_test[:50])
