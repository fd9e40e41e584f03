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
from vae_pipeline.data.dataset import read_manifest
from vae_pipeline.data.errors import DataError, NoImages
from vae_pipeline.data.images import (
    BadImage,
    describe_fitting,
    fit_into_box,
    list_images,
    load_image,
)
from vae_pipeline.data.preparation import SPLITS, content_hash
from vae_pipeline.data.sources import snapshot_source, source_kind
from vae_pipeline.evaluate import LATENT_MEANS
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
    # one file per image: the monitor scores files, and its copy is not versioned
    folder = Path(cfg.monitor.snapshot_dir) / "images"
    mcfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"source": source, "raw_dir": str(folder), "layout": "files"}
            )
        }
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
    """The images of `folder` whose file bytes are not among `known` (the cheap filter;
    `drop_known_pixels` then drops re-encodings of prepared images)."""
    return [p for p in list_images(folder) if content_hash(p.read_bytes()) not in known]


def pixel_hash(arr: np.ndarray) -> str:
    """sha256 of a fitted (C, H, W) uint8 image's pixels."""
    return content_hash(np.ascontiguousarray(arr, np.uint8).tobytes())


def prepared_pixel_hashes(cfg: Config, workdir: Path = Path("."), chunk: int = 4096) -> set[str]:
    """`pixel_hash` of every prepared image (each row of data/prepared/{split}_images.npy,
    read memory-mapped in chunks)."""
    out: set[str] = set()
    for split in SPLITS:
        path = workdir / cfg.data.prepared_dir / f"{split}_images.npy"
        if not path.is_file():
            continue
        rows = np.load(path, mmap_mode="r")
        for start in range(0, len(rows), chunk):
            out.update(pixel_hash(row) for row in np.asarray(rows[start : start + chunk]))
    return out


def fit_file(cfg: Config, path: Path, box: list[int] | None = None) -> np.ndarray:
    """Decode `path` and fit it as the champion's training data was fitted (`fit_into_box`
    with its content box; prepare's own rule without one): (C, H, W) uint8."""
    img = load_image(path, cfg.data.channels, cfg.data.max_image_pixels)
    return fit_into_box(img, cfg.data.image_size, box)


def drop_known_pixels(
    cfg: Config, paths: list[Path], known: set[str], box: list[int] | None = None
) -> tuple[list[Path], int]:
    """(the `paths` whose fitted pixels are not a prepared image's, how many were): a PNG
    re-encoded, or a 28x28 file of an image the IDX data holds, is not new. Files that do not
    decode stay in (`load_images` reports them)."""
    if not known:
        return list(paths), 0
    kept = []
    for path in paths:
        try:
            if pixel_hash(fit_file(cfg, path, box)) in known:
                continue
        except BadImage:
            pass
        kept.append(path)
    return kept, len(paths) - len(kept)


def load_images(
    cfg: Config,
    folder: Path,
    paths: list[Path],
    max_images: int,
    seed: int,
    box: list[int] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Up to `max_images` of `paths` (a seeded sample when there are more), decoded and fitted
    as the training data was (`fit_file`; prepare's rule when `box` is None): (names relative
    to `folder`, uint8 tensor N x C x H x W)."""
    if len(paths) > max_images:
        keep = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    names, arrays = [], []
    for path in paths:
        try:
            arrays.append(fit_file(cfg, path, box))
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


def _sample_rows(n_rows: int, n: int, seed: int) -> np.ndarray:
    return np.sort(np.random.default_rng(seed).choice(n_rows, min(n, n_rows), replace=False))


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
    rows = _sample_rows(len(test), n, seed)
    return torch.from_numpy(np.ascontiguousarray(test[rows])), ""


def stored_latents(uri: str, mv) -> np.ndarray | None:
    """The encoder means of the champion's own test split, as its evaluation stored them in
    its run (None for a version registered without them)."""
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path=f"reports/{LATENT_MEANS}",
            dst_path=tempfile.mkdtemp(prefix="vae-monitor-"),
            tracking_uri=uri,
        )
    except Exception:  # not stored with this version: the caller says what it uses instead
        return None
    return np.load(local)


def reference_latents(cfg: Config, uri: str, mv, model, workdir: Path, binarize: str):
    """The latent check's reference: (encoder means of a seeded sample of the champion's own
    test images, where they came from) or (None, why the check cannot run).

    The champion's stored test latent means first: they are its pinned test data, whatever the
    workspace holds now (a rejected retrain on other data may have replaced data/prepared).
    Else the prepared test split here, only when it is the champion's test data version."""
    mcfg = cfg.monitor
    wanted = (mv.tags or {}).get("test_data_version")
    stored = stored_latents(uri, mv)
    if stored is not None and len(stored) >= 2:
        rows = _sample_rows(len(stored), mcfg.max_images, mcfg.seed)
        where = f"v{mv.version}'s test split (data version {wanted}), stored with its run"
        return np.asarray(stored[rows], np.float64), where
    manifest = workdir / cfg.data.prepared_dir / "manifest.json"
    have = (
        read_manifest(workdir / cfg.data.prepared_dir).get("data_version")
        if manifest.is_file()
        else None
    )
    if wanted and have and have != wanted:
        return None, (
            f"v{mv.version} was tested on data version {wanted} and its run stores no test "
            f"latent means; the prepared test split here is data version {have}: restore the "
            f"champion's data (`vae-pipeline lineage {mv.version} --restore`, `dvc pull`, "
            "`vae-pipeline prepare`) or re-register the champion"
        )
    images, why = reference_images(cfg, model, workdir, mcfg.max_images, mcfg.seed)
    if images is None:
        return None, why
    _, ref_mu = score(cfg, model, images, binarize, mcfg.seed + 1)
    return ref_mu, f"the prepared test split here (data version {have})"


def fitting_box(cfg: Config, model, mv) -> list[int] | None:
    """The content box the champion's training data was fitted into (its `content_box`
    hparam), to fit new images the same way; refuses data settings the champion cannot take."""
    data = cfg.data
    if (model.in_channels, model.image_size) != (data.channels, data.image_size):
        raise MonitorError(
            f"{mv.name} v{mv.version} takes {model.in_channels} x {model.image_size} x "
            f"{model.image_size} images, data.channels / data.image_size give {data.channels} "
            f"x {data.image_size} x {data.image_size}: set them to the champion's"
        )
    return None if model.content_box is None else list(model.content_box)


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
    known = 0
    if fresh:
        mcfg = cfg.monitor
        model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
        box = fitting_box(cfg, model, mv)
        found["fitting"] = describe_fitting(cfg.data.image_size, box)
        fresh, known = drop_known_pixels(cfg, fresh, prepared_pixel_hashes(cfg, workdir), box)
        names, images = load_images(cfg, folder, fresh, mcfg.max_images, mcfg.seed, box)
    found["already_known"] = known
    if folder is None:
        decision = no_new_data(0, reference, cfg.monitor, always, why)
    elif len(names) < 2:
        unreadable = f" ({len(fresh) - len(names)} unreadable)" if len(fresh) > len(names) else ""
        same = f" ({known} more with the pixels of prepared images)" if known else ""
        why = (
            f"{len(names)} usable new image(s){unreadable} since the prepared data{same}: the "
            "checks need 2 or more: nothing to measure"
        )
        decision = no_new_data(len(names), reference, cfg.monitor, always, why)
    else:
        binarize = tags.get("binarize", "none")
        scores, new_mu = score(cfg, model, images, binarize, cfg.monitor.seed)
        ref_mu, note = None, "monitor.latent_check is off"
        if cfg.monitor.latent_check:
            ref_mu, note = reference_latents(cfg, uri, mv, model, workdir, binarize)
            if ref_mu is not None:
                found["latent_reference"] = note
        decision = drift_decision(
            scores, reference, cfg.monitor, always, new_mu, ref_mu, latent_note=note
        )
    log.info(
        "monitor: %d new of %d images in %s (%d more already known by their pixels), scored "
        "with %s v%s: %s",
        len(fresh),
        found["snapshot_images"],
        source,
        known,
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
