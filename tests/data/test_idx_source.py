"""`data.source: idx:<folder>`: any dataset in the four-file MNIST layout."""

import gzip

import numpy as np
import pytest

from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.preparation import prepare, read_idx
from vae_pipeline.data.sources import snapshot_source

from ..conftest import FASHION_MNIST_DIR, tiny_params


def _write_idx(path, array: np.ndarray, gz: bool = False) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as fh:
            fh.write(data)
    else:
        path.write_bytes(data)


def _dataset(folder, prefix="", labels=True, classes=True, n_train=40, n_test=12):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8)
    _write_idx(folder / f"{prefix}train-images-idx3-ubyte", train, gz=True)
    _write_idx(folder / f"{prefix}t10k-images-idx3-ubyte", test)
    if labels:
        _write_idx(folder / f"{prefix}train-labels-idx1-ubyte", np.arange(n_train) % 3, gz=True)
        _write_idx(folder / f"{prefix}t10k-labels-idx1-ubyte", np.arange(n_test) % 3)
    if classes:
        (folder / "classes.txt").write_text("zero\none\ntwo\n")
    return train, test


def _cfg(source, **data):
    params = tiny_params()
    params["data"].update({"source": source, "limit": None, "val_fraction": 0.25, **data})
    return build_config(params)


def test_an_idx_folder_is_ingested_and_prepared_like_fashion_mnist(tmp_path):
    train, test = _dataset(tmp_path / "digits")
    cfg = _cfg(f"idx:{tmp_path / 'digits'}")
    report = snapshot_source(cfg, tmp_path)
    assert report.kind == "idx" and report.images == 52
    manifest = prepare(cfg, tmp_path, data_version="v1")
    assert manifest["label_names"] == ["zero", "one", "two"]
    assert manifest["content_box"] == [2, 2, 28, 28]
    assert manifest["counts"]["test"] == 12
    assert manifest["counts"]["train"] + manifest["counts"]["val"] == 40
    split = PreparedSplit(tmp_path / "data/prepared", "test")
    images = split.tensor().numpy()
    assert images.shape == (12, 1, 32, 32)
    np.testing.assert_array_equal(images[:, 0, 2:30, 2:30], test)  # the official test order
    assert images[:, :, :2].max() == 0 and images[:, :, 30:].max() == 0  # zero padding
    np.testing.assert_array_equal(split.labels, np.arange(12) % 3)


def test_labels_and_class_names_are_optional(tmp_path):
    _dataset(tmp_path / "unlabelled", labels=False, classes=False)
    cfg = _cfg(f"idx:{tmp_path / 'unlabelled'}")
    snapshot_source(cfg, tmp_path)
    manifest = prepare(cfg, tmp_path)
    assert manifest["label_names"] == []
    assert (PreparedSplit(tmp_path / "data/prepared", "train").labels == -1).all()
    _dataset(tmp_path / "numbered", classes=False)
    cfg = _cfg(f"idx:{tmp_path / 'numbered'}")
    snapshot_source(cfg, tmp_path)
    assert prepare(cfg, tmp_path)["label_names"] == ["0", "1", "2"]


def test_emnist_style_prefixes_and_ambiguous_or_incomplete_folders(tmp_path):
    _dataset(tmp_path / "emnist", prefix="emnist-digits-")
    cfg = _cfg(f"idx:{tmp_path / 'emnist'}")
    assert snapshot_source(cfg, tmp_path).images == 52
    _dataset(tmp_path / "emnist", prefix="emnist-letters-")  # a second split beside it
    with pytest.raises(DataError, match=r"several (train|test) images IDX files \(emnist-digits-"):
        snapshot_source(cfg, tmp_path)
    (tmp_path / "half").mkdir()
    _write_idx(tmp_path / "half" / "train-images-idx3-ubyte", np.zeros((3, 28, 28)))
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        snapshot_source(_cfg(f"idx:{tmp_path / 'half'}"), tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        snapshot_source(_cfg(f"idx:{tmp_path / 'missing'}"), tmp_path)
    # the failed ingests left the last good snapshot in place
    assert (tmp_path / "data/raw/IDX/train-images-idx3-ubyte").is_file()


def test_fashion_mnist_through_idx_gives_the_same_prepared_data(tmp_path):
    by_name = build_config(tiny_params())
    by_idx = _cfg(f"idx:{FASHION_MNIST_DIR}", limit=256, val_fraction=0.1)
    snapshot_source(by_name, tmp_path / "a")
    a = prepare(by_name, tmp_path / "a")
    snapshot_source(by_idx, tmp_path / "b")
    (tmp_path / "b" / "data" / "raw" / "IDX" / "classes.txt").write_text(
        "\n".join(a["label_names"])
    )
    b = prepare(by_idx, tmp_path / "b")
    assert a["counts"] == b["counts"] and a["content_box"] == b["content_box"] == [2, 2, 28, 28]
    for split in ("train", "val", "test"):
        x = PreparedSplit(tmp_path / "a" / "data/prepared", split)
        y = PreparedSplit(tmp_path / "b" / "data/prepared", split)
        np.testing.assert_array_equal(x.tensor().numpy(), y.tensor().numpy())
        np.testing.assert_array_equal(x.labels, y.labels)


def test_read_idx_refuses_other_files(tmp_path):
    (tmp_path / "x").write_bytes(b"\x89PNG....")
    with pytest.raises(DataError, match="not an IDX file"):
        read_idx(tmp_path / "x")
    _write_idx(tmp_path / "y", np.zeros((4, 5, 5)))
    (tmp_path / "y").write_bytes((tmp_path / "y").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "y")
