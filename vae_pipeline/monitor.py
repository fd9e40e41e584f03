"""Data drift against the champion: score the new images of a snapshot and compare with the
champion's own test set.

New images are those whose content is not in the prepared data (data/prepared/index.csv):
the monitored source may keep old images beside new arrivals.

The score is the negative ELBO (nats per image, one posterior sample from each image's own
seeded stream, as in evaluation). The reference is the champion's per-example negative ELBO on
the test set it was evaluated on, stored with its MLflow run. The shift is the difference of
the two means; a retrain is due when its one-sided lower confidence bound passes
`monitor.threshold_nats`, so a small snapshot's noise does not start one.
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import NormalDist

import mlflow
import numpy as np
import torch

from vae_pipeline.config import Config, MonitorConfig
from vae_pipeline.data import snapshot_source
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.images import BadImage, decode_image, list_images
from vae_pipeline.data.preparation import content_hash
from vae_pipeline.data.sources import source_kind
from vae_pipeline.evaluate import per_example_terms
from vae_pipeline.registry import PER_EXAMPLE, champion
from vae_pipeline.tracking import client_for, download_weights
from vae_pipeline.train import load_model

log = logging.getLogger(__name__)


class MonitorError(RuntimeError):
    """The monitor cannot score: no champion, no reference, or no usable images."""


@dataclass
class DriftDecision:
    retrain: bool
    drift: bool
    reason: str
    shift: float  # mean new score minus mean reference score, nats per image
    stderr: float
    lower_bound: float
    threshold: float
    confidence: float
    new_mean: float
    new_n: int
    reference_mean: float
    reference_n: int

    def as_dict(self) -> dict:
        return asdict(self)


def drift_decision(
    new: np.ndarray, reference: np.ndarray, mcfg: MonitorConfig, always: bool = False
) -> DriftDecision:
    """Compare per-image scores (negative ELBO) of new images with the reference's.

    stderr is that of a difference of two independent means (Welch); the lower bound is
    shift - z(confidence) * stderr. Drift: the lower bound exceeds the threshold.
    """
    new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
    if len(new) < 2 or len(reference) < 2:
        raise MonitorError(
            f"need at least 2 scores on each side (new {len(new)}, reference {len(reference)})"
        )
    shift = float(new.mean() - reference.mean())
    stderr = math.sqrt(new.var(ddof=1) / len(new) + reference.var(ddof=1) / len(reference))
    lower = shift - NormalDist().inv_cdf(mcfg.confidence) * stderr
    drift = lower > mcfg.threshold_nats
    level = f"{mcfg.confidence:.0%}"
    if drift:
        reason = (
            f"shift {shift:+.2f} nats/image, {level} lower bound {lower:+.2f} > threshold "
            f"{mcfg.threshold_nats:g}"
        )
    else:
        reason = (
            f"shift {shift:+.2f} nats/image, {level} lower bound {lower:+.2f} <= threshold "
            f"{mcfg.threshold_nats:g}: no drift"
        )
    if always and not drift:
        reason += "; retraining anyway (always_retrain)"
    return DriftDecision(
        retrain=drift or always,
        drift=drift,
        reason=reason,
        shift=shift,
        stderr=stderr,
        lower_bound=lower,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=float(new.mean()),
        new_n=len(new),
        reference_mean=float(reference.mean()),
        reference_n=len(reference),
    )


def monitor_source(cfg: Config, source: str | None = None) -> str:
    return source or cfg.monitor.source or cfg.data.source


FIXED_SOURCE = (
    "{source} is a fixed dataset: no new images to score (point monitor.source or --source at "
    "the folder, archive or s3:// prefix where new images arrive)"
)


def snapshot(cfg: Config, source: str, workdir: Path = Path(".")) -> Path | None:
    """Incrementally copy `source` into monitor.snapshot_dir, checking every new image as
    ingest does (bad ones are left out per data.on_bad_image); returns the folder, or None
    for Fashion-MNIST (a fixed dataset: nothing new ever arrives)."""
    if source_kind(source) == "fashion-mnist":
        return None
    folder = Path(cfg.monitor.snapshot_dir) / "images"
    mcfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"source": source, "raw_dir": str(folder)})}
    )
    snapshot_source(mcfg, workdir)
    return workdir / folder


def known_hashes(cfg: Config, workdir: Path = Path(".")) -> set[str]:
    """Content hashes (sha256) of the images in the prepared data (its index.csv)."""
    index = workdir / cfg.data.prepared_dir / "index.csv"
    if not index.is_file():
        return set()
    with open(index, newline="") as fh:
        return {row["sha256"] for row in csv.DictReader(fh)}


def new_images(folder: Path, known: set[str]) -> list[Path]:
    """The images of `folder` whose content is not among `known`."""
    return [p for p in list_images(folder) if content_hash(p.read_bytes()) not in known]


def load_images(
    cfg: Config, folder: Path, paths: list[Path], max_images: int, seed: int
) -> tuple[list[str], torch.Tensor]:
    """Up to `max_images` of `paths` (a seeded sample when there are more), decoded as
    prepare does: (names relative to `folder`, uint8 tensor N x C x H x W)."""
    if len(paths) > max_images:
        keep = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    names, arrays = [], []
    for path in paths:
        try:
            arrays.append(
                decode_image(
                    path, cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels
                )
            )
            names.append(str(path.relative_to(folder)))
        except BadImage as exc:
            log.warning("not scoring %s", exc)
    if len(arrays) < 2:
        raise DataError(f"{folder} holds {len(arrays)} readable image(s): the monitor needs 2+")
    return names, torch.from_numpy(np.stack(arrays))


def champion_reference(cfg: Config, uri: str):
    """(champion model version, its per-example negative ELBO on its own test set)."""
    name = cfg.registry.model_name
    mv = champion(client_for(uri), name)
    if mv is None:
        raise MonitorError(f"{name} has no champion to compare with: run the retrain flow first")
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path=PER_EXAMPLE.format(metric="elbo_nll"),
            dst_path=tempfile.mkdtemp(prefix="vae-monitor-"),
            tracking_uri=uri,
        )
    except Exception as exc:
        raise MonitorError(
            f"{name} v{mv.version}: its run {mv.run_id} holds no per-example ELBO "
            f"({exc}); re-register it with `vae-pipeline register`"
        ) from exc
    return mv, np.load(local)


def score(cfg: Config, model, images: torch.Tensor, binarize: str, seed: int) -> np.ndarray:
    """Per-image negative ELBO (nats), evaluated like the reference: same binarize policy,
    one posterior sample from each image's seeded stream."""
    ecfg = cfg.evaluate.model_copy(
        update={"iw_samples": 1, "iw_chunk": 1, "binarize": binarize, "seed": seed}
    )
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    )
    return -per_example_terms(model, images, ecfg, device)["elbo"]


def check_drift(
    cfg: Config,
    uri: str,
    workdir: Path = Path("."),
    source: str | None = None,
    always: bool | None = None,
) -> dict:
    """Snapshot the monitored source, score it with the champion, decide whether to retrain."""
    source = monitor_source(cfg, source)
    always = cfg.monitor.always_retrain if always is None else always
    mv, reference = champion_reference(cfg, uri)
    tags = mv.tags or {}
    folder = snapshot(cfg, source, workdir)
    fresh = [] if folder is None else new_images(folder, known_hashes(cfg, workdir))
    found = {
        "source": source,
        "snapshot_images": 0 if folder is None else len(list_images(folder)),
        "champion_version": str(mv.version),
        "champion_test_data_version": tags.get("test_data_version"),
    }
    if folder is None:
        why = FIXED_SOURCE.format(source=source)
        decision = no_new_data(0, reference, cfg.monitor, always, why)
    elif len(fresh) < 2:
        decision = no_new_data(len(fresh), reference, cfg.monitor, always)
    else:
        names, images = load_images(cfg, folder, fresh, cfg.monitor.max_images, cfg.monitor.seed)
        model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
        scores = score(cfg, model, images, tags.get("binarize", "none"), cfg.monitor.seed)
        decision = drift_decision(scores, reference, cfg.monitor, always)
    log.info(
        "monitor: %d new of %d images in %s, scored with %s v%s: %s",
        len(fresh),
        found["snapshot_images"],
        source,
        mv.name,
        mv.version,
        decision.reason,
    )
    return {**found, "new_images": len(fresh), **decision.as_dict()}


def no_new_data(
    n_new: int, reference: np.ndarray, mcfg: MonitorConfig, always: bool, why: str | None = None
) -> DriftDecision:
    """The decision when fewer than 2 images are new: nothing to measure."""
    reason = why or f"{n_new} new image(s) since the prepared data: nothing to measure"
    if always:
        reason += "; retraining anyway (always_retrain)"
    nan = math.nan
    return DriftDecision(
        retrain=always,
        drift=False,
        reason=reason,
        shift=nan,
        stderr=nan,
        lower_bound=nan,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=nan,
        new_n=n_new,
        reference_mean=float(np.mean(reference)),
        reference_n=len(reference),
    )
