"""Fixed datasets in the IDX format: Fashion-MNIST (from the Debian package's folder or a
download) and `idx:<folder>` sources (the MNIST layout), copied into the snapshot as they are."""

from __future__ import annotations

import gzip
import re
import shutil
from pathlib import Path

from vae_pipeline.data.errors import DataError

FASHION_MNIST = "fashion-mnist"


FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


INSTALL_HINT = (
    "install Debian's package (apt-get install dataset-fashion-mnist), point "
    "data.fashion_mnist_dir at a folder holding the IDX files, or set "
    "data.fashion_mnist_dir=null to let torchvision download them (needs network)"
)


def copy_fashion_mnist(src_dir: Path, dest: Path) -> None:
    target = dest / "FashionMNIST" / "raw"
    target.mkdir(parents=True)
    for name in FASHION_MNIST_FILES:
        plain, packed = src_dir / name, src_dir / f"{name}.gz"
        if plain.is_file():
            shutil.copyfile(plain, target / name)
        elif packed.is_file():
            with gzip.open(packed, "rb") as fin, open(target / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        else:
            raise DataError(
                f"Fashion-MNIST file {name}(.gz) not found in {src_dir}: {INSTALL_HINT}"
            )


def fashion_mnist_count(dest: Path) -> int:
    raw = dest / "FashionMNIST" / "raw"
    total = 0
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        with open(raw / name, "rb") as fh:
            total += int.from_bytes(fh.read(8)[4:8], "big")  # IDX header: magic, count
    return total


def download_fashion_mnist(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(root=str(dest), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading Fashion-MNIST failed ({exc}): {INSTALL_HINT}") from exc
    for gz in (dest / "FashionMNIST" / "raw").glob("*.gz"):
        gz.unlink()  # keep one copy of the data in the versioned snapshot


IDX_PREFIX = "idx:"


IDX_DIR = "IDX"  # the snapshot's folder of an idx: source


IDX_CLASSES = "classes.txt"


# train-images-idx3-ubyte, t10k-labels-idx1-ubyte.gz, emnist-digits-test-images-idx3-ubyte,
# train-images.idx3-ubyte: (prefix)(train|t10k|test)-(images|labels)[-.]idx(3|1)-ubyte(.gz)
_IDX_NAME = re.compile(r"(?:^|-)(train|t10k|test)-(images|labels)[-.]idx([13])-ubyte(\.gz)?$")


IDX_ROLES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}


def idx_files(folder: Path) -> dict[tuple[str, str], Path]:
    """The folder's IDX files by (split, kind); refuses a folder with two candidates for one
    role (e.g. several EMNIST splits side by side) or without both image files."""
    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(folder.iterdir()):
        match = _IDX_NAME.search(path.name)
        if match and path.is_file():
            split = "train" if match.group(1) == "train" else "test"
            found.setdefault((split, match.group(2)), []).append(path)
    for role, paths in found.items():
        if len(paths) > 1:
            names = ", ".join(p.name for p in paths)
            raise DataError(
                f"{folder} holds several {role[0]} {role[1]} IDX files ({names}): point "
                "data.source at a folder with one dataset's four files"
            )
    missing = [IDX_ROLES[r] for r in (("train", "images"), ("test", "images")) if r not in found]
    if missing:
        raise DataError(
            f"{folder} has no {' or '.join(missing)}(.gz): an idx: source needs the MNIST "
            "layout (train-images-idx3-ubyte, t10k-images-idx3-ubyte, and optionally the "
            "two -labels-idx1-ubyte files), plain or gzipped"
        )
    return {role: paths[0] for role, paths in found.items()}


def copy_idx(src_dir: Path, dest: Path) -> int:
    """Copy (decompressing) an IDX folder into dest/IDX; returns the number of images."""
    if not src_dir.is_dir():
        raise DataError(
            f"data.source idx:{src_dir}: no such folder; point it at a folder holding the "
            "MNIST-layout IDX files"
        )
    target = dest / IDX_DIR
    target.mkdir(parents=True)
    total = 0
    for role, path in idx_files(src_dir).items():
        opener = gzip.open if path.name.endswith(".gz") else open
        with opener(path, "rb") as fin, open(target / IDX_ROLES[role], "wb") as fout:
            shutil.copyfileobj(fin, fout)
        if role[1] == "images":
            with open(target / IDX_ROLES[role], "rb") as fh:
                total += int.from_bytes(fh.read(8)[4:8], "big")
    if (src_dir / IDX_CLASSES).is_file():
        shutil.copyfile(src_dir / IDX_CLASSES, target / IDX_CLASSES)
    return total
