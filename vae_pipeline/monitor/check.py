"""The monitor's numbers: the monitored source's snapshot, its new images, their scores under
the champion, and the check that runs the statistics of `monitor.drift` on them (the rule is in
the package's docstring and docs/orchestration.md)."""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import torch

from vae_pipeline.config import Config
from vae_pipeline.config.sections import MonitorConfig
from vae_pipeline.data.errors import DataError, NoImages
from vae_pipeline.data.images import BadImage, decode_image, list_images
from vae_pipeline.data.preparation import content_hash
from vae_pipeline.data.sources import snapshot_source, source_kind
from vae_pipeline.evaluate.estimator import per_example_terms
from vae_pipeline.monitor.drift import (
    DriftDecision,
    MonitorError,
    drift_decision,
)
from vae_pipeline.registry.versions import PER_EXAMPLE, champion
from vae_pipeline.tracking import client_for, download_weights
from vae_pipeline.train.checkpoint import load_model
from vae_pipeline.train.distributed import pick_device

log = logging.getLogger(__name__)


def monitor_source(cfg: Config, source: str | None = None) -> str:
    return source or cfg.monitor.source or cfg.data.source


FIXED_SOURCE = (
    "{source} is a fixed dataset: no new images to score (point monitor.source or --source at "
    "the folder, archive or s3:// prefix where new images arrive)"
)


def check_source(source: str, workdir: Path = Path(".")) -> None:
    """Refuse a local monitor.source that does not exist, naming the setting (before a flow
    starts, so the error is one line)."""
    kind = source_kind(source)
    if kind in ("folder", "archive") and not (workdir / source).exists():
        raise MonitorError(
            f"monitor.source {source!r} does not exist: point monitor.source (or --source) at "
            "the folder, archive or s3:// prefix where new images land"
        )


def snapshot(cfg: Config, source: str, workdir: Path = Path(".")) -> tuple[Path | None, str]:
    """Incrementally copy `source` into monitor.snapshot_dir, checking every new image as
    ingest does (bad ones are left out per data.on_bad_image): (the folder, "") or (None, why
    there is nothing to score: a fixed dataset, or a source without one usable image)."""
    if source_kind(source) in ("fashion-mnist", "idx"):
        return None, FIXED_SOURCE.format(source=source)
    check_source(source, workdir)
    folder = Path(cfg.monitor.snapshot_dir) / "images"
    mcfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"source": source, "raw_dir": str(folder)})}
    )
    try:
        snapshot_source(mcfg, workdir)
    except NoImages as exc:
        return None, f"monitor.source: {exc}: nothing to measure"
    except DataError as exc:
        raise MonitorError(f"monitor.source: {exc}") from exc
    return workdir / folder, ""


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
    """Up to `max_images` of `paths` (a seeded sample when there are more), decoded and fitted
    as prepare does: (names relative to `folder`, uint8 tensor N x C x H x W)."""
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
    shape = (0, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return names, torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(
        shape, dtype=torch.uint8
    )


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


def score(
    cfg: Config, model, images: torch.Tensor, binarize: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(per-image negative ELBO in nats, encoder means), evaluated like the reference: same
    binarize policy, one posterior sample from each image's seeded stream."""
    ecfg = cfg.evaluate.model_copy(
        update={"iw_samples": 1, "iw_chunk": 1, "binarize": binarize, "seed": seed}
    )
    terms = per_example_terms(model, images, ecfg, pick_device(cfg.train.device))
    return -terms["elbo"], np.asarray(terms["mu"], np.float64)


def reference_images(cfg: Config, model, workdir: Path, n: int, seed: int):
    """A seeded sample of up to `n` prepared test images for the latent check: (uint8 tensor,
    "") or (None, why the check cannot run)."""
    path = workdir / cfg.data.prepared_dir / "test_images.npy"
    if not path.is_file():
        return None, (
            f"no prepared test split ({path.name} in {cfg.data.prepared_dir}) to compare "
            "latent codes with: run `dvc pull` or `vae-pipeline prepare` here"
        )
    test = np.load(path, mmap_mode="r")
    expected = (model.in_channels, model.image_size, model.image_size)
    if tuple(test.shape[1:]) != expected or len(test) < 2:
        return None, (
            f"the prepared test images are {len(test)} x {tuple(test.shape[1:])}, the champion "
            f"takes {expected}: re-prepare with the champion's data settings"
        )
    rows = np.sort(np.random.default_rng(seed).choice(len(test), min(n, len(test)), replace=False))
    return torch.from_numpy(np.ascontiguousarray(test[rows])), ""


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
    folder, why = snapshot(cfg, source, workdir)
    fresh = [] if folder is None else new_images(folder, known_hashes(cfg, workdir))
    found = {
        "source": source,
        "snapshot_images": 0 if folder is None else len(list_images(folder)),
        "champion_version": str(mv.version),
        "champion_test_data_version": tags.get("test_data_version"),
    }
    names: list[str] = []
    if fresh:
        mcfg = cfg.monitor
        names, images = load_images(cfg, folder, fresh, mcfg.max_images, mcfg.seed)
    if folder is None:
        decision = no_new_data(0, reference, cfg.monitor, always, why)
    elif len(names) < 2:
        unreadable = f" ({len(fresh) - len(names)} unreadable)" if len(fresh) > len(names) else ""
        why = (
            f"{len(names)} usable new image(s){unreadable} since the prepared data: the checks "
            "need 2 or more: nothing to measure"
        )
        decision = no_new_data(len(names), reference, cfg.monitor, always, why)
    else:
        model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
        binarize = tags.get("binarize", "none")
        scores, new_mu = score(cfg, model, images, binarize, cfg.monitor.seed)
        ref_mu, note = None, "monitor.latent_check is off"
        if cfg.monitor.latent_check:
            ref_images, note = reference_images(
                cfg, model, workdir, cfg.monitor.max_images, cfg.monitor.seed
            )
            if ref_images is not None:
                _, ref_mu = score(cfg, model, ref_images, binarize, cfg.monitor.seed + 1)
        decision = drift_decision(
            scores, reference, cfg.monitor, always, new_mu, ref_mu, latent_note=note
        )
    log.info(
        "monitor: %d new of %d images in %s, scored with %s v%s: %s",
        len(fresh),
        found["snapshot_images"],
        source,
        mv.name,
        mv.version,
        decision.reason,
    )
    for check in decision.checks:
        log.info("monitor: %s", check["line"])
    return {**found, "new_images": len(fresh), **decision.as_dict()}


def no_new_data(
    n_new: int, reference: np.ndarray, mcfg: MonitorConfig, always: bool, why: str
) -> DriftDecision:
    """The decision when fewer than 2 images can be scored: nothing to measure."""
    reason = why
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
        upper_bound=nan,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=nan,
        new_n=n_new,
        reference_mean=float(np.mean(reference)),
        reference_n=len(reference),
    )
