"""Turn the raw snapshot into uint8 arrays per split, plus a manifest and a per-image index.

Output in `data.prepared_dir`:
  {train,val,test}_images.npy   uint8 (N, C, H, W), read memory-mapped
  {train,val,test}_labels.npy   int64 (N,), -1 where the source has no label
  index.csv                     split, row, source, sha256, label: one line per image
  manifest.json                 data version, sizes, counts, label names, skipped bad images,
                                duplicates left out (same bytes as another image)

Images are decoded in worker processes (`data.decode_workers`) straight into memory-mapped
files, so memory use does not grow with the dataset.

Splits are a deterministic function of each image's content hash, so an image never moves
between splits when the dataset grows. Fashion-MNIST keeps its official test set (the one
published numbers use); its validation images come out of the training set by hash.
"""

from __future__ import annotations

import csv
import functools
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from vae_pipeline.config import Config
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.images import decode_worker, fit_array, list_images, padded_box
from vae_pipeline.data.pools import map_bounded, worker_count
from vae_pipeline.data.shard_prepare import decode_shards, plan_shards
from vae_pipeline.data.shards import is_sharded
from vae_pipeline.data.splits import (  # noqa: F401 - importable from here, as before
    SPLITS,
    assign_split,
    content_hash,
    hash_fraction,
    plan_splits,
)

log = logging.getLogger(__name__)


def content_box(side: int, size: int) -> list[int] | None:
    """Where a side x side image sits in the size x size prepared one (`fit_array` pads it):
    [top, left, height, width] (None when it fills the square)."""
    return padded_box(side, side, size)


def fit_fashion_mnist(images: torch.Tensor, size: int, channels: int) -> np.ndarray:
    """(N, side, side) uint8 -> (N, C, size, size) by `fit_array`'s rule, the one every source
    follows: zero-pad (the background is black), or resize and crop when size < side. (Any
    square IDX image set is fitted the same way.)"""
    x = images.unsqueeze(1).numpy()
    side = x.shape[-1]
    if size >= side:  # the padding, for all images at once (what fit_array does to each)
        box = padded_box(side, side, size) or [0, 0, side, side]
        out = np.zeros((len(x), 1, size, size), np.uint8)
        out[:, :, box[0] : box[0] + side, box[1] : box[1] + side] = x
    else:
        out = np.stack([fit_array(a, size) for a in x]) if len(x) else x[:, :, :size, :size]
    if channels == 3:
        out = np.repeat(out, 3, axis=1)
    return np.ascontiguousarray(out)


def _load_fashion_mnist(cfg: Config, raw: Path) -> tuple[dict, list[str], list[str]]:
    from torchvision.datasets import FashionMNIST

    rows: dict[str, list] = {s: [] for s in SPLITS}
    label_names: list[str] = []
    for train in (True, False):
        try:
            ds = FashionMNIST(root=str(raw), train=train, download=False)
        except RuntimeError as exc:
            raise DataError(
                f"raw snapshot {raw} has no Fashion-MNIST IDX files ({exc}): run "
                "`vae-pipeline ingest` first"
            ) from exc
        label_names = list(ds.classes)
        images = fit_fashion_mnist(ds.data, cfg.data.image_size, cfg.data.channels)
        part = "train" if train else "t10k"
        for i, (img, label) in enumerate(zip(images, ds.targets.tolist(), strict=True)):
            digest = content_hash(ds.data[i].numpy().tobytes())
            split = assign_split(digest, cfg.data.val_fraction, 0.0) if train else "test"
            rows[split].append((img, label, f"{part}[{i}]", digest))
    return rows, label_names, []


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: 2 zero bytes, type 0x08 = uint8, the number of dims,
    then each dim as a big-endian int32, then the data)."""
    with open(path, "rb") as fh:
        header = fh.read(4)
        if len(header) < 4 or header[:2] != b"\0\0" or header[2] != 0x08:
            raise DataError(f"{path} is not an IDX file of unsigned bytes (header {header!r})")
        dims = [int.from_bytes(fh.read(4), "big") for _ in range(header[3])]
        data = np.frombuffer(fh.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: {data.size} bytes for dims {dims}")
    return data.reshape(dims)


def _load_idx(cfg: Config, folder: Path) -> tuple[dict, list[str], list[str]]:
    """An idx: snapshot's rows per split, as `_load_fashion_mnist` gives them."""
    from vae_pipeline.data.fixed_sources import IDX_CLASSES, IDX_ROLES

    rows: dict[str, list] = {s: [] for s in SPLITS}
    max_label = -1
    for part in ("train", "test"):
        images = read_idx(folder / IDX_ROLES[(part, "images")])
        if images.ndim != 3 or images.shape[1] != images.shape[2]:
            raise DataError(
                f"{folder / IDX_ROLES[(part, 'images')]}: images of shape {images.shape[1:]}; "
                "an idx: source needs square grayscale images (N, side, side)"
            )
        label_path = folder / IDX_ROLES[(part, "labels")]
        labels = read_idx(label_path).astype(np.int64) if label_path.is_file() else None
        if labels is not None and len(labels) != len(images):
            raise DataError(f"{label_path}: {len(labels)} labels for {len(images)} images")
        if labels is None:
            labels = np.full(len(images), -1, dtype=np.int64)
        max_label = max(max_label, int(labels.max(initial=-1)))
        fitted = fit_fashion_mnist(
            torch.from_numpy(images.copy()), cfg.data.image_size, cfg.data.channels
        )
        name = "train" if part == "train" else "t10k"
        for i, (img, label) in enumerate(zip(fitted, labels.tolist(), strict=True)):
            digest = content_hash(images[i].tobytes())
            split = assign_split(digest, cfg.data.val_fraction, 0.0) if part == "train" else "test"
            rows[split].append((img, label, f"{name}[{i}]", digest))
    names_path = folder / IDX_CLASSES
    if names_path.is_file():
        label_names = [n.strip() for n in names_path.read_text().splitlines() if n.strip()]
        if len(label_names) <= max_label:
            raise DataError(
                f"{names_path} names {len(label_names)} classes but the labels go up to "
                f"{max_label}: one name per line, in label order"
            )
    else:
        label_names = [str(k) for k in range(max_label + 1)]
    return rows, label_names, []


@dataclass
class _Item:
    path: Path
    rel: str
    digest: str
    label_dir: str | None
    label: int = -1


def _plan_folder(cfg: Config, raw: Path) -> tuple[dict[str, list[_Item]], list[str], list[dict]]:
    """Hash every image, drop exact duplicates (the first path in sorted order stays) and
    assign each to its split by content hash: a plan, before any pixel is decoded."""
    root = raw / "images"
    files = list_images(root) if root.is_dir() else []
    if not files:
        raise DataError(f"raw snapshot {root} holds no images: run `vae-pipeline ingest` first")
    first: dict[str, _Item] = {}
    duplicates: list[dict] = []
    for path in tqdm(files, desc="hash", unit="img", mininterval=2.0, disable=len(files) < 5000):
        rel = path.relative_to(root)
        digest = content_hash(path.read_bytes())
        label_dir = rel.parts[0] if len(rel.parts) > 1 else None
        if digest in first:
            duplicates.append({"path": rel.as_posix(), "duplicate_of": first[digest].rel})
            continue
        first[digest] = _Item(path, rel.as_posix(), digest, label_dir)
    d = cfg.data
    plan, label_names = plan_splits(
        list(first.values()), duplicates, d.val_fraction, d.test_fraction
    )
    return plan, label_names, duplicates


def _decode_files(cfg: Config, plan: dict[str, list[_Item]], staging: Path, arrays: dict):
    """The planned files decoded in worker processes, each written to its row here."""
    order = [(split, row, item) for split in SPLITS for row, item in enumerate(plan[split])]
    jobs = [
        (str(i.path), cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels)
        for _, _, i in order
    ]
    results = map_bounded(decode_worker, jobs, len(jobs), worker_count(cfg), "decode")
    for (split, row, _), result in zip(order, results, strict=True):
        if isinstance(result, str):
            yield split, row, result, None
            continue
        arrays[split][row], size = result
        yield split, row, None, size


def _decode_into(
    cfg: Config, plan: dict[str, list], staging: Path, shape: tuple[int, int, int], fill=None
) -> tuple[dict[str, list], list[int] | None]:
    """Decode every planned image in worker processes straight into memory-mapped .npy files
    (memory stays flat however large the dataset); returns the items that decoded, and the
    content box they share (when every one of them was padded alike, else None).

    `fill(cfg, plan, staging, arrays)` does the decoding and yields (split, row, problem or
    None, the image's own size); by default the planned items are files, decoded here."""
    arrays = {
        split: np.lib.format.open_memmap(
            staging / f"{split}_images.npy",
            mode="w+",
            dtype=np.uint8,
            shape=(len(plan[split]), *shape),
        )
        for split in SPLITS
        if plan[split]
    }
    good: dict[str, list[bool]] = {s: [True] * len(plan[s]) for s in SPLITS}
    sizes: set[tuple[int, int]] = set()
    for split, row, problem, size in (fill or _decode_files)(cfg, plan, staging, arrays):
        if problem is not None:
            if cfg.data.on_bad_image == "fail":
                raise DataError(
                    f"{problem}; nothing was written (set data.on_bad_image=skip to skip bad "
                    "images)"
                )
            log.warning("skipping bad image %s", problem)
            good[split][row] = False
            continue
        sizes.add(size)
    kept: dict[str, list[_Item]] = {}
    for split in SPLITS:
        keep = [i for i, ok in zip(plan[split], good[split], strict=True) if ok]
        kept[split] = keep
        if split not in arrays:
            np.save(staging / f"{split}_images.npy", np.zeros((0, *shape), np.uint8))
            continue
        arrays[split].flush()
        if len(keep) < len(plan[split]):  # rare: compact the rows that decoded
            mask = np.asarray(good[split])
            compact = np.ascontiguousarray(arrays[split][mask])
            del arrays[split]
            np.save(staging / f"{split}_images.npy", compact)
    del arrays
    box = padded_box(*sizes.pop(), cfg.data.image_size) if len(sizes) == 1 else None
    return kept, box


def snapshot_source_of(cfg: Config, workdir: Path) -> str:
    """The source the raw snapshot was taken from, as its ingest report recorded it (an
    `ingest --source` overrides params.yaml for that ingest only); data.source without one."""
    from vae_pipeline.data.intake import report_path

    try:
        return json.loads(report_path(cfg, workdir).read_text())["source"]
    except (OSError, ValueError, KeyError):
        return cfg.data.source


def read_idx_side(raw: Path) -> int:
    """The side of the square images in an IDX snapshot (Fashion-MNIST's or an idx: one)."""
    from vae_pipeline.data.fixed_sources import IDX_DIR

    folder = raw / IDX_DIR if (raw / IDX_DIR).is_dir() else raw / "FashionMNIST" / "raw"
    with open(folder / "train-images-idx3-ubyte", "rb") as fh:
        header = fh.read(16)
    return int.from_bytes(header[12:16], "big")


def _require_train_and_test(counts: dict[str, int], raw: Path) -> None:
    advice = {
        "train": "add images, or lower data.test_fraction / data.val_fraction",
        "test": "add images, or raise data.test_fraction",
    }
    for split in ("train", "test"):
        if not counts[split]:
            raise DataError(
                f"split {split!r} is empty after preparing {raw} ({counts}): {advice[split]}"
            )


def _require_raw(cfg: Config, raw: Path) -> None:
    if raw.is_dir():
        return
    pointer = raw.with_name(raw.name + ".dvc")
    how = (
        f"`dvc pull {cfg.data.raw_dir.rstrip('/')}.dvc` fetches the data version it names"
        if pointer.is_file()
        else "`vae-pipeline ingest` snapshots data.source, or `vae-pipeline lineage VERSION "
        "--restore` then `dvc pull` brings a registered version's data"
    )
    raise DataError(f"raw data folder {raw} does not exist: {how}")


_Index = dict[str, list[tuple[str, str, int]]]  # split -> (source, sha256, label) per row
# what staging a snapshot gives: (index, label names, content box, bad images, duplicates)
_Staged = tuple[_Index, list[str], list[int] | None, list[str], list[dict]]


def _stage_idx(cfg: Config, raw: Path, staging: Path, shape: tuple[int, int, int]) -> _Staged:
    """An IDX snapshot (Fashion-MNIST's or an idx: one): its split images, saved in staging."""
    from vae_pipeline.data.fixed_sources import IDX_DIR

    if (raw / IDX_DIR).is_dir():
        rows, label_names, _ = _load_idx(cfg, raw / IDX_DIR)
    else:
        rows, label_names, _ = _load_fashion_mnist(cfg, raw)
    box = content_box(int(read_idx_side(raw)), cfg.data.image_size)
    rows = {s: r[: cfg.data.limit] for s, r in rows.items()} if cfg.data.limit else rows
    _require_train_and_test({s: len(r) for s, r in rows.items()}, raw)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for split in SPLITS:
        items = rows[split]
        images = np.stack([r[0] for r in items]) if items else np.zeros((0, *shape), np.uint8)
        np.save(staging / f"{split}_images.npy", images)
    index = {s: [(src, digest, label) for _, label, src, digest in rows[s]] for s in SPLITS}
    return index, label_names, box, [], []


def _stage_folder(cfg: Config, raw: Path, staging: Path, shape: tuple[int, int, int]) -> _Staged:
    """A folder, archive or S3 snapshot (shards, or one file per image): planned by hash,
    then decoded into staging (bad images left out)."""
    fill = None
    if is_sharded(raw):
        plan, label_names, duplicates = plan_shards(cfg, raw)
        fill = functools.partial(decode_shards, raw)
    else:
        plan, label_names, duplicates = _plan_folder(cfg, raw)
    plan = {s: p[: cfg.data.limit] for s, p in plan.items()} if cfg.data.limit else plan
    _require_train_and_test({s: len(p) for s, p in plan.items()}, raw)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    kept, box = _decode_into(cfg, plan, staging, shape, fill)
    kept_rels = {i.rel for items in kept.values() for i in items}
    bad = [i.rel for s in SPLITS for i in plan[s] if i.rel not in kept_rels]
    _require_train_and_test({s: len(k) for s, k in kept.items()}, raw)
    index = {s: [(i.rel, i.digest, i.label) for i in kept[s]] for s in SPLITS}
    return index, label_names, box, bad, duplicates


def _write_index(staging: Path, index: _Index) -> None:
    """index.csv (one line per image) and the {split}_labels.npy arrays."""
    with open(staging / "index.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["split", "row", "source", "sha256", "label"])
        for split in SPLITS:
            labels = np.asarray([label for _, _, label in index[split]], dtype=np.int64)
            np.save(staging / f"{split}_labels.npy", labels)
            for row, (source, digest, label) in enumerate(index[split]):
                writer.writerow([split, row, source, digest, label])


def prepare(cfg: Config, workdir: Path = Path("."), data_version: str = "unversioned") -> dict:
    """Build the prepared splits from the raw snapshot; returns the manifest.

    Everything is written to a staging folder that replaces `data.prepared_dir` only at the
    end: a failure (or a bad image under on_bad_image=fail) leaves the previous one as it was.
    """
    raw = (workdir / cfg.data.raw_dir).resolve()
    _require_raw(cfg, raw)
    out = (workdir / cfg.data.prepared_dir).resolve()
    staging = out.with_name(out.name + ".staging")
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    try:
        # the layout of the snapshot, not data.source, decides (ingest may have had --source)
        from vae_pipeline.data.fixed_sources import IDX_DIR

        is_idx = (raw / "FashionMNIST").is_dir() or (raw / IDX_DIR).is_dir()
        stage = _stage_idx if is_idx else _stage_folder
        index, label_names, box, bad, duplicates = stage(cfg, raw, staging, shape)
        _write_index(staging, index)
        manifest = {
            "data_version": data_version,
            "source": snapshot_source_of(cfg, workdir),
            "image_size": cfg.data.image_size,
            "channels": cfg.data.channels,
            "counts": {s: len(index[s]) for s in SPLITS},
            # the source's real pixels inside the prepared image (null: all of it)
            "content_box": box,
            "label_names": label_names,
            "bad_images": bad,
            "duplicates": duplicates,
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    log.info(
        "prepared %s in %s (%d bad images skipped, %d duplicates left out)",
        manifest["counts"],
        out,
        len(bad),
        len(duplicates),
    )
    return manifest
