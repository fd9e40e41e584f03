"""Applying a trained model to images: anomaly scores, embeddings, samples, interpolations.

The library side of `vae-pipeline score | encode | sample | interpolate`. Images come from a
folder (sub-folder names are labels, as at ingest) or a prepared split (with the source path
and label of every row); tables are written as CSV or Parquet, chosen by the file's suffix.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vae_pipeline.config import Config
from vae_pipeline.config.sections import EvaluateConfig
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.data.errors import DataError
from vae_pipeline.errors import UserError
from vae_pipeline.evaluate.anomaly import anomaly_scores
from vae_pipeline.evaluate.estimator import encode_means, per_example_terms
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)

TABLE_SUFFIXES = (".csv", ".parquet")


@dataclass
class ImageSet:
    names: list[str]  # source path of each image (relative to its folder / the raw snapshot)
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,), -1 = unlabelled
    label_names: list[str] = field(default_factory=list)
    data_version: str | None = None


def folder_images(cfg: Config, folder: Path) -> ImageSet:
    """Every readable image under `folder`, decoded like `prepare` does; the first sub-folder
    of a path is its label. Unreadable files follow data.on_bad_image."""
    from vae_pipeline.data.images import BadImage, decode_image, list_images

    if not folder.is_dir():
        raise DataError(f"--images {folder} is not a folder")
    names, arrays, label_dirs = [], [], []
    for path in list_images(folder):
        try:
            arrays.append(decode_image(path, cfg.data.image_size, cfg.data.channels))
        except BadImage as exc:
            if cfg.data.on_bad_image == "fail":
                raise DataError(f"{exc} (set data.on_bad_image=skip to skip it)") from None
            log.warning("skipping %s", exc)
            continue
        rel = path.relative_to(folder)
        names.append(rel.as_posix())
        label_dirs.append(rel.parts[0] if len(rel.parts) > 1 else None)
    if not arrays:
        raise DataError(f"--images {folder} holds no readable images")
    label_names = sorted({d for d in label_dirs if d is not None})
    labels = np.array([label_names.index(d) if d else -1 for d in label_dirs], dtype=np.int64)
    return ImageSet(names, torch.from_numpy(np.stack(arrays)), labels, label_names)


def split_images(cfg: Config, split: str, workdir: Path = Path(".")) -> ImageSet:
    """A prepared split, with each row's source path from the prepared index.csv."""
    prepared = workdir / cfg.data.prepared_dir
    data = PreparedSplit(prepared, split)
    names = [f"{split}[{i}]" for i in range(len(data))]
    index = prepared / "index.csv"
    if index.is_file():
        with open(index, newline="") as fh:
            for row in csv.DictReader(fh):
                if row["split"] == split and int(row["row"]) < len(names):
                    names[int(row["row"])] = row["source"]
    return ImageSet(
        names,
        data.tensor(),
        np.asarray(data.labels),
        list(data.manifest.get("label_names") or []),
        data.manifest.get("data_version"),
    )


def image_ref(cfg: Config, ref: str, workdir: Path = Path(".")) -> tuple[str, torch.Tensor]:
    """One image: a file path, or SPLIT:ROW of a prepared split (e.g. test:12)."""
    from vae_pipeline.data.images import BadImage, decode_image

    split, _, row = ref.partition(":")
    if split in ("train", "val", "test") and row.isdigit() and not Path(ref).exists():
        data = PreparedSplit(workdir / cfg.data.prepared_dir, split)
        if int(row) >= len(data):
            raise DataError(f"{ref}: the {split} split has {len(data)} images (rows 0..)")
        return ref, data.tensor(int(row), int(row) + 1)[0]
    path = Path(ref)
    if not path.is_file():
        raise DataError(f"{ref} is neither an image file nor SPLIT:ROW (e.g. test:12)")
    try:
        return ref, torch.from_numpy(decode_image(path, cfg.data.image_size, cfg.data.channels))
    except BadImage as exc:
        raise DataError(str(exc)) from None


def check_table_path(path: Path) -> None:
    """Refuse an output path whose suffix is neither .csv nor .parquet, before any work."""
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise UserError(f"--out {path}: the suffix must be .csv or .parquet")


def write_table(path: Path, columns: dict[str, list | np.ndarray], metadata: dict) -> Path:
    """Columns (equal lengths) as CSV or Parquet (by suffix). Parquet carries `metadata` as
    JSON under the key `vae_pipeline`; the CSV has a sidecar PATH.json with it."""
    check_table_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({k: pa.array(np.asarray(v).tolist()) for k, v in columns.items()})
        table = table.replace_schema_metadata({"vae_pipeline": json.dumps(metadata)})
        pq.write_table(table, path)
        return path
    names = list(columns)
    rows = zip(*(np.asarray(columns[n]).tolist() for n in names), strict=True)
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(rows)
    path.with_name(path.name + ".json").write_text(json.dumps(metadata, indent=2))
    return path


def score_columns(
    model: ConvVAE,
    data: ImageSet,
    ecfg: EvaluateConfig,
    device: torch.device,
    threshold: dict | None = None,
) -> dict[str, list | np.ndarray]:
    """Per image: negative ELBO and negative IW bound (K = evaluate.iw_samples, or the
    threshold's own K) the image's complexity L(x) and floor (`evaluate.anomaly.complexity`), in nats; with a
    threshold ({"score", "threshold"} and, for typicality, "reference"), is_anomaly."""
    if threshold is not None and threshold.get("k"):
        ecfg = ecfg.model_copy(update={"iw_samples": int(threshold["k"])})
    terms = per_example_terms(model, data.images, ecfg, device)
    columns: dict[str, list | np.ndarray] = {
        "image": data.names,
        "label": _label_column(data),
        "neg_elbo_nats": -terms["elbo"],
        "iw_nll_nats": -terms["iw_log_px"],
        "complexity_nats": terms["complexity"],
        "floor_nats": terms["floor"],
    }
    if threshold is not None:
        scores = anomaly_scores(terms, threshold["score"], threshold.get("reference"))
        columns["is_anomaly"] = scores > float(threshold["threshold"])
    return columns


def encode_columns(
    model: ConvVAE, data: ImageSet, device: torch.device
) -> dict[str, list | np.ndarray]:
    """Per image: the posterior's means mu_0.. and log-variances logvar_0..."""
    mu, logvar = encode_means(model, data.images, device)
    columns: dict[str, list | np.ndarray] = {"image": data.names, "label": _label_column(data)}
    columns.update({f"mu_{j}": mu[:, j] for j in range(mu.shape[1])})
    columns.update({f"logvar_{j}": logvar[:, j] for j in range(logvar.shape[1])})
    return columns


def _label_column(data: ImageSet) -> list[str]:
    return [data.label_names[k] if k >= 0 else "" for k in data.labels.tolist()]


@torch.no_grad()
def interpolate(
    model: ConvVAE, a: torch.Tensor, b: torch.Tensor, steps: int, device: torch.device
) -> torch.Tensor:
    """[a, decode of `steps` points on the line from mu(a) to mu(b) (ends included), b], in
    [0, 1]: a (steps + 2, C, H, W) strip."""
    if steps < 2:
        raise UserError(f"--steps must be at least 2, not {steps}")
    model.eval().to(device)
    x = to_unit_float(torch.stack([a, b]).to(device))
    mu, _ = model.encode(x)
    t = torch.linspace(0, 1, steps, device=device).unsqueeze(1)
    decoded = model.decode(mu[:1] * (1 - t) + mu[1:] * t)
    return torch.cat([x[:1], decoded, x[1:]]).cpu()
