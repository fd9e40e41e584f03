"""Snapshot a data source into the raw area (`data.raw_dir`), which DVC then versions.

Layouts inside the raw area:
- Fashion-MNIST: `FashionMNIST/raw/<IDX files>`, where torchvision's FashionMNIST reads them.
- Image folder: `images/<relative path>`, the folder's own tree (sub-folders are labels).

The snapshot is built beside the raw area and swapped in at the end, so a failure half-way
leaves the previous snapshot as it was.
"""

from __future__ import annotations

import gzip
import logging
import shutil
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.images import list_images

log = logging.getLogger(__name__)

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


def _copy_fashion_mnist(src_dir: Path, dest: Path) -> None:
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


def _download_fashion_mnist(dest: Path) -> None:
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(root=str(dest), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DataError(f"downloading Fashion-MNIST failed ({exc}): {INSTALL_HINT}") from exc
    for gz in (dest / "FashionMNIST" / "raw").glob("*.gz"):
        gz.unlink()  # keep one copy of the data in the versioned snapshot


def _copy_folder(src: Path, dest: Path) -> int:
    files = list_images(src)
    if not files:
        raise DataError(
            f"data source {src} holds no images (looked for .png .jpg .jpeg .webp .bmp, recursively)"
        )
    for path in files:
        out = dest / "images" / path.relative_to(src)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out)
    return len(files)


def snapshot_source(cfg: Config, workdir: Path = Path(".")) -> Path:
    """Copy `data.source` into `data.raw_dir` (replacing the previous snapshot) and return it."""
    raw = (workdir / cfg.data.raw_dir).resolve()
    staging = raw.with_name(raw.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        if cfg.data.source == FASHION_MNIST:
            if cfg.data.fashion_mnist_dir is None:
                _download_fashion_mnist(staging)
            else:
                src_dir = Path(cfg.data.fashion_mnist_dir)
                if not src_dir.is_dir():
                    raise DataError(
                        f"Fashion-MNIST folder {src_dir} does not exist: {INSTALL_HINT}"
                    )
                _copy_fashion_mnist(src_dir, staging)
            log.info("snapshot of Fashion-MNIST in %s", raw)
        else:
            src = (workdir / cfg.data.source).resolve()
            if not src.is_dir():
                raise DataError(
                    f"data.source {cfg.data.source!r} is neither 'fashion-mnist' nor an existing "
                    "folder of images: fix the path in params.yaml or with --set data.source=PATH"
                )
            n = _copy_folder(src, staging)
            log.info("snapshot of %d images from %s in %s", n, src, raw)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = raw.with_name(raw.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if raw.exists():
        raw.rename(old)
    staging.rename(raw)
    shutil.rmtree(old, ignore_errors=True)
    return raw
