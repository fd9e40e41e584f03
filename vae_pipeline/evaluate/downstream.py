"""The VAE's downstream tasks, measured: anomaly detection (the threshold, AUROC/AUPRC on a
held-out class), the few-label probe on latent means vs raw pixels, and sample quality (a
Frechet distance in the test images' PCA space).

The maths are plain NumPy / scikit-learn functions over scores, features and labels;
`measure_uses` feeds them the model's numbers, and their pictures are in `evaluate.pictures`.
Units: scores are nats per image (higher = more anomalous); accuracies are fractions of the test
images; the Frechet distance is in squared feature units.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from vae_pipeline.config import Config
from vae_pipeline.config.sections import ProbeConfig
from vae_pipeline.data.dataset import PreparedSplit, resolve_label
from vae_pipeline.evaluate import pictures
from vae_pipeline.evaluate.anomaly import anomaly_scores, calibrate
from vae_pipeline.evaluate.estimator import (
    encode_means,
    per_example_terms,
    prior_samples,
)
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)
ANOMALY_SCORES = "per_example_anomaly_score.npy"  # beside the reports' other per-example values


# --- anomaly detection -------------------------------------------------------------------------


def auroc_auprc(scores: np.ndarray, is_anomaly: np.ndarray) -> tuple[float, float]:
    """Area under the ROC curve and average precision (the PR curve's area, step-wise) of
    `scores` ranking the anomalies (True) above the normal images."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    is_anomaly = np.asarray(is_anomaly, dtype=bool)
    if is_anomaly.all() or not is_anomaly.any():
        raise ValueError("AUROC needs both anomalies and normal images among the test images")
    return (
        float(roc_auc_score(is_anomaly, scores)),
        float(average_precision_score(is_anomaly, scores)),
    )


# --- few-label probe ---------------------------------------------------------------------------


def draw_per_class(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray | None:
    """Positions of `n` images of each label (>= 0) drawn without replacement, or None when a
    label has fewer than `n` images."""
    picks = []
    for label in np.unique(labels[labels >= 0]):
        where = np.flatnonzero(labels == label)
        if len(where) < n:
            return None
        picks.append(rng.choice(where, size=n, replace=False))
    return np.sort(np.concatenate(picks)) if picks else None


def probe_accuracy(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    max_iter: int = 1000,
) -> float:
    """Test accuracy of a multinomial logistic regression (standardised features, L2, C=1).

    BLAS runs single-threaded here: these problems are small, and OpenBLAS threads competing
    with torch's (or another process) made a fit 10x slower on 2 cores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
        probe.fit(train_x, train_y)
        return float((probe.predict(test_x) == test_y).mean())


FeatureFn = Callable[[np.ndarray], np.ndarray]


def few_label_probe(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    features: dict[str, tuple[FeatureFn, np.ndarray]],
    pcfg: ProbeConfig,
) -> tuple[dict[str, float], dict[str, dict[int, list[float]]], list[int]]:
    """The probe for every N in probe.labels_per_class, `probe.draws` label draws each.

    `features`: kind ("latent", "pixel") -> (function from training-split positions to their
    feature rows, the test images' feature rows). The same draws serve every kind. Returns
    (metrics `probe_<kind>_acc_n<N>` and `..._std`, per-draw accuracies, the N skipped because
    some class has fewer training images than N).
    """
    rng = np.random.default_rng(pcfg.seed)
    keep = test_labels >= 0
    draws: dict[int, list[np.ndarray]] = {}
    skipped = []
    for n in pcfg.labels_per_class:
        chosen = [draw_per_class(train_labels, n, rng) for _ in range(pcfg.draws)]
        if any(c is None for c in chosen):
            skipped.append(n)
        else:
            draws[n] = chosen
    metrics: dict[str, float] = {}
    per_draw: dict[str, dict[int, list[float]]] = {}
    if not draws:
        return metrics, per_draw, skipped
    every = np.unique(np.concatenate([p for ps in draws.values() for p in ps]))
    for kind, (train_fn, test_x) in features.items():
        rows = train_fn(every)  # each needed training image's features, computed once
        per_draw[kind] = {}
        for n, positions in draws.items():
            accs = [
                probe_accuracy(
                    rows[np.searchsorted(every, p)],
                    train_labels[p],
                    test_x[keep],
                    test_labels[keep],
                    pcfg.max_iter,
                )
                for p in positions
            ]
            per_draw[kind][n] = accs
            name = f"probe_{kind}_acc_n{n}"
            metrics[name] = float(np.mean(accs))
            metrics[f"{name}_std"] = float(np.std(accs, ddof=1)) if len(accs) > 1 else 0.0
    return metrics, per_draw, skipped


# --- sample quality ----------------------------------------------------------------------------


def pca_basis(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, the top-k principal directions as rows) of the rows of `x`."""
    x = np.asarray(x, dtype=np.float64)
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    return mean, vt[: min(k, len(vt))]


def project(x: np.ndarray, basis: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    mean, components = basis
    return (np.asarray(x, dtype=np.float64) - mean) @ components.T


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((m + m.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the rows of `a` and of `b`:
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2) (FID's formula)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("the Frechet distance needs at least 2 rows on each side")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    s_a = np.atleast_2d(np.cov(a, rowvar=False))
    s_b = np.atleast_2d(np.cov(b, rowvar=False))
    root_a = _sqrt_psd(s_a)
    cross = np.linalg.eigvalsh(root_a @ s_b @ root_a)
    trace_cross = float(np.sqrt(np.clip(cross, 0.0, None)).sum())
    value = float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * trace_cross)
    return max(value, 0.0)


# --- measured on the model ---------------------------------------------------------------------


def seeded_subset(n: int, size: int, seed: int) -> np.ndarray:
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
    prepared = workdir / cfg.data.prepared_dir
    names = list(test.manifest.get("label_names") or [])
    holdout = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
    out: dict = {"holdout_class": None if holdout is None else names[holdout]}
    labels = np.asarray(test.labels)
    is_anomaly = None if holdout is None else labels == holdout
    normal = np.ones(len(labels), bool) if is_anomaly is None else ~is_anomaly
    scores, threshold, title = _anomaly(
        cfg, model, prepared, holdout, terms, is_anomaly, device, out
    )
    per_draw = _probe(cfg, model, prepared, images, labels, terms, device, out)
    _sample_quality(cfg, model, prepared, holdout, images, normal, device, out)
    if pictures_dir is not None:
        pictures_dir.mkdir(parents=True, exist_ok=True)
        np.save(pictures_dir / ANOMALY_SCORES, scores)  # anomaly.score of each test image
        pictures.plot_anomaly_scores(
            scores,
            is_anomaly,
            threshold,
            cfg.anomaly.score,
            pictures_dir / "anomaly_scores.png",
            anomaly_name=f"{out['holdout_class']} (held out)",
            title=title,
        )
        if (labels >= 0).any():
            xy = project(terms["mu"], pca_basis(terms["mu"], 2))
            pictures.plot_latent_pca(xy, labels, names, pictures_dir / "latent_pca.png", holdout)
        pictures.plot_probe(per_draw, out.get("probe_chance", 0.0), pictures_dir / "probe.png")
    return out


def _anomaly(
    cfg: Config,
    model: ConvVAE,
    prepared: Path,
    holdout: int | None,
    terms: dict[str, np.ndarray],
    is_anomaly: np.ndarray | None,
    device: torch.device,
    out: dict,
) -> tuple[np.ndarray, float, str]:
    """The threshold from validation images of the training classes, its flag rate on the
    normal test images and, with a held-out class, AUROC/AUPRC; into `out`. Returns the test
    images' scores, the threshold and the pictures' title."""
    ecfg, score_name = cfg.evaluate, cfg.anomaly.score
    calib = PreparedSplit(prepared, "val", holdout)
    if len(calib) < 2:
        log.warning("the validation split has < 2 images: calibrating on the training split")
        calib = PreparedSplit(prepared, "train", holdout)
    pos = seeded_subset(len(calib), cfg.anomaly.calibration_images, ecfg.seed)
    log.info("anomaly threshold: scoring %d %s images", len(pos), calib.split)
    cal_terms = per_example_terms(model, calib.take(pos), ecfg, device, torch.from_numpy(pos))
    threshold, reference = calibrate(cal_terms, score_name, cfg.anomaly.threshold_percentile)
    scores = anomaly_scores(terms, score_name, reference)
    normal = np.ones(len(scores), bool) if is_anomaly is None else ~is_anomaly
    out.update(
        anomaly_score=score_name,
        anomaly_threshold=threshold,
        anomaly_threshold_percentile=cfg.anomaly.threshold_percentile,
        anomaly_calibration_images=len(pos),
        # The threshold on the test images: the false alarm rate it was calibrated for.
        anomaly_flag_rate_normal=float((scores[normal] > threshold).mean()),
    )
    if reference is not None:  # typicality: the validation values the tails are measured on
        out["anomaly_reference"] = reference
    title = f"{score_name} of the test images"
    if is_anomaly is not None and is_anomaly.any() and normal.any():
        auroc, auprc = auroc_auprc(scores, is_anomaly)
        out.update(
            anomaly_auroc=auroc,
            anomaly_auprc=auprc,
            anomaly_recall=float((scores[is_anomaly] > threshold).mean()),
            anomaly_fraction=float(is_anomaly.mean()),
        )
        title += f": AUROC {auroc:.3f}, AUPRC {auprc:.3f}"
    elif is_anomaly is not None:
        log.warning("the test split lacks %s or normal images: no AUROC", out["holdout_class"])
    return scores, threshold, title


def _probe(
    cfg: Config,
    model: ConvVAE,
    prepared: Path,
    images: torch.Tensor,
    labels: np.ndarray,
    terms: dict[str, np.ndarray],
    device: torch.device,
    out: dict,
) -> dict:
    """The few-label probe on every class (the held-out one too: it is only unseen by the
    VAE), into `out`; returns the per-draw accuracies for the picture."""
    train = PreparedSplit(prepared, "train")
    per_draw: dict = {}
    classes = np.unique(np.asarray(train.labels)[np.asarray(train.labels) >= 0])
    if len(classes) == 1:
        log.info("few-label probe skipped: the training images have one label (%d)", classes[0])
    if not ((labels >= 0).any() and len(classes) >= 2):
        return per_draw

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
    probe, per_draw, skipped = few_label_probe(
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
    return per_draw


def _sample_quality(
    cfg: Config,
    model: ConvVAE,
    prepared: Path,
    holdout: int | None,
    images: torch.Tensor,
    normal: np.ndarray,
    device: torch.device,
    out: dict,
) -> None:
    """Prior samples vs test images of the training classes, in the PCA space of those test
    images; the reference is real training images scored the same way; into `out`."""
    ecfg, gcfg = cfg.evaluate, cfg.generation
    keep = np.flatnonzero(normal)
    ref_pool = PreparedSplit(prepared, "train", holdout)
    n = min(gcfg.fd_images, len(keep), len(ref_pool))
    if n < 2:
        return
    real = images[keep[seeded_subset(len(keep), n, ecfg.seed)]].flatten(1).numpy() / 255.0
    reference = ref_pool.take(seeded_subset(len(ref_pool), n, ecfg.seed + 1))
    samples = prior_samples(model, n, ecfg.seed, device).flatten(1).numpy()
    basis = pca_basis(real, gcfg.fd_components)
    real_f = project(real, basis)
    out["sample_fd"] = frechet_distance(project(samples, basis), real_f)
    out["sample_fd_reference"] = frechet_distance(
        project(reference.flatten(1).numpy() / 255.0, basis), real_f
    )
    out["sample_fd_images"] = n
