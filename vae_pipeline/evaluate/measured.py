"""The VAE's uses measured on the model: the anomaly threshold (and AUROC/AUPRC on a held-out
class), the few-label probe, and the sample-quality distance, with their pictures."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from vae_pipeline import uses
from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, resolve_label
from vae_pipeline.evaluate.estimator import (
    anomaly_scores,
    encode_means,
    per_example_terms,
    prior_samples,
)
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)


def _seeded_subset(n: int, size: int, seed: int) -> np.ndarray:
    """`size` of range(n) (all when n <= size), seeded, in increasing order."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


def uses_key(cfg: Config, holdout_class: str | None) -> str:
    """What must match, beside the evaluation's eval_key, for two models' uses metrics to be
    compared (promotion.floors); `holdout_class` is the held-out label's name."""
    a, p, g = cfg.anomaly, cfg.probe, cfg.generation
    return (
        f"holdout={holdout_class}|score={a.score}|pct={a.threshold_percentile}"
        f"|cal={a.calibration_images}|probe={p.labels_per_class},{p.draws},{p.seed},"
        f"{p.max_iter}|fd={g.fd_images},{g.fd_components}"
    )


def measure_uses(
    cfg: Config,
    model: ConvVAE,
    test: PreparedSplit,
    images: torch.Tensor,
    terms: dict[str, np.ndarray],
    workdir: Path,
    device: torch.device,
    pictures_dir: Path | None = None,
) -> dict:
    """Anomaly threshold (and AUROC/AUPRC on anomaly.holdout_class), the few-label probe on
    latent means vs raw pixels, and sample_fd; with `pictures_dir`, their pictures."""
    ecfg = cfg.evaluate
    prepared = workdir / cfg.data.prepared_dir
    names = list(test.manifest.get("label_names") or [])
    holdout = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
    out: dict = {"holdout_class": None if holdout is None else names[holdout]}
    labels = np.asarray(test.labels)

    # Anomaly: threshold from validation images of the training classes.
    score_name = cfg.anomaly.score
    scores = anomaly_scores(terms, score_name)
    calib = PreparedSplit(prepared, "val", holdout)
    if len(calib) < 2:
        log.warning("the validation split has < 2 images: calibrating on the training split")
        calib = PreparedSplit(prepared, "train", holdout)
    pos = _seeded_subset(len(calib), cfg.anomaly.calibration_images, ecfg.seed)
    log.info("anomaly threshold: scoring %d %s images", len(pos), calib.split)
    cal_terms = per_example_terms(model, calib.take(pos), ecfg, device, torch.from_numpy(pos))
    threshold = uses.calibrate_threshold(
        anomaly_scores(cal_terms, score_name), cfg.anomaly.threshold_percentile
    )
    is_anomaly = None if holdout is None else labels == holdout
    normal = np.ones(len(scores), bool) if is_anomaly is None else ~is_anomaly
    out.update(
        anomaly_score=score_name,
        anomaly_threshold=threshold,
        anomaly_threshold_percentile=cfg.anomaly.threshold_percentile,
        anomaly_calibration_images=len(pos),
        # The threshold on the test images: the false alarm rate it was calibrated for.
        anomaly_flag_rate_normal=float((scores[normal] > threshold).mean()),
    )
    title = f"{score_name} of the test images"
    if is_anomaly is not None and is_anomaly.any() and normal.any():
        auroc, auprc = uses.auroc_auprc(scores, is_anomaly)
        out.update(
            anomaly_auroc=auroc,
            anomaly_auprc=auprc,
            anomaly_recall=float((scores[is_anomaly] > threshold).mean()),
            anomaly_fraction=float(is_anomaly.mean()),
        )
        title += f": AUROC {auroc:.3f}, AUPRC {auprc:.3f}"
    elif is_anomaly is not None:
        log.warning("the test split lacks %s or normal images: no AUROC", out["holdout_class"])

    # Few-label probe, on every class (the held-out one too: it is only unseen by the VAE).
    train = PreparedSplit(prepared, "train")
    per_draw: dict = {}
    classes = np.unique(np.asarray(train.labels)[np.asarray(train.labels) >= 0])
    if len(classes) == 1:
        log.info("few-label probe skipped: the training images have one label (%d)", classes[0])
    if (labels >= 0).any() and len(classes) >= 2:

        def latent(positions: np.ndarray) -> np.ndarray:
            return encode_means(model, train.take(positions), device)[0]

        def pixels(positions: np.ndarray) -> np.ndarray:
            return train.take(positions).flatten(1).numpy() / 255.0

        test_pixels = images.flatten(1).numpy() / 255.0
        log.info(
            "few-label probe: N=%s labels per class, %d draws, latent means and pixels",
            cfg.probe.labels_per_class,
            cfg.probe.draws,
        )
        probe, per_draw, skipped = uses.few_label_probe(
            np.asarray(train.labels),
            labels,
            {"latent": (latent, terms["mu"]), "pixel": (pixels, test_pixels)},
            cfg.probe,
        )
        out.update(probe)
        out["probe_chance"] = 1.0 / len(np.unique(labels[labels >= 0]))
        if skipped:
            out["probe_skipped_n"] = skipped
            log.warning(
                "probe: N=%s skipped (a class has fewer training images)",
                ", ".join(map(str, skipped)),
            )

    # Sample quality: prior samples vs test images of the training classes, in the PCA space
    # of those test images; the reference is real training images scored the same way.
    gcfg = cfg.generation
    keep = np.flatnonzero(normal)
    ref_pool = PreparedSplit(prepared, "train", holdout)
    n = min(gcfg.fd_images, len(keep), len(ref_pool))
    if n >= 2:
        real = images[keep[_seeded_subset(len(keep), n, ecfg.seed)]].flatten(1).numpy() / 255.0
        reference = ref_pool.take(_seeded_subset(len(ref_pool), n, ecfg.seed + 1))
        samples = prior_samples(model, n, ecfg.seed, device).flatten(1).numpy()
        basis = uses.pca_basis(real, gcfg.fd_components)
        real_f = uses.project(real, basis)
        out["sample_fd"] = uses.frechet_distance(uses.project(samples, basis), real_f)
        out["sample_fd_reference"] = uses.frechet_distance(
            uses.project(reference.flatten(1).numpy() / 255.0, basis), real_f
        )
        out["sample_fd_images"] = n

    if pictures_dir is not None:
        pictures_dir.mkdir(parents=True, exist_ok=True)
        uses.plot_anomaly_scores(
            scores,
            is_anomaly,
            threshold,
            score_name,
            pictures_dir / "anomaly_scores.png",
            anomaly_name=f"{out['holdout_class']} (held out)",
            title=title,
        )
        if (labels >= 0).any():
            uses.plot_latent_pca(
                terms["mu"], labels, names, pictures_dir / "latent_pca.png", holdout
            )
        uses.plot_probe(per_draw, out.get("probe_chance", 0.0), pictures_dir / "probe.png")
    return out
