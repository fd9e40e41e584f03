"""The VAE's uses, measured: anomaly detection, few-label learning, sample quality, embeddings.

Plain NumPy / scikit-learn functions over scores, features and labels; `evaluate.measure_uses`
feeds them the model's numbers. Units: scores are nats per image (higher = more anomalous);
accuracies are fractions of the test images; the Frechet distance is in squared feature units.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vae_pipeline.config import ProbeConfig

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


def calibrate_threshold(scores: np.ndarray, percentile: float) -> float:
    """The `percentile` of normal images' scores: images scoring above it are anomalies."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs finite scores of at least one validation image")
    return float(np.percentile(scores, percentile))


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


# --- pictures ----------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latent_pca(
    mu: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    path: Path,
    holdout: int | None = None,
    title: str = "latent means, first two principal components",
) -> Path:
    """Scatter of the latent means' first two principal components, one colour per label."""
    plt = _pyplot()
    xy = project(mu, pca_basis(mu, 2))
    if xy.shape[1] < 2:
        xy = np.column_stack([xy[:, 0], np.zeros(len(xy))])
    fig, ax = plt.subplots(figsize=(7, 5.5))
    cmap = plt.get_cmap("tab10" if len(label_names) <= 10 else "tab20")
    present = [int(v) for v in np.unique(labels)]
    for label in present:
        where = labels == label
        name = label_names[label] if 0 <= label < len(label_names) else "unlabelled"
        held = label == holdout
        ax.scatter(
            xy[where, 0],
            xy[where, 1],
            s=14 if held else 5,
            marker="x" if held else "o",
            color="black" if held else cmap(label % cmap.N),
            alpha=0.9 if held else 0.6,
            label=f"{name} (held out)" if held else name,
            linewidths=0.8 if held else 0,
        )
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(title)
    ax.legend(markerscale=2.5, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_anomaly_scores(
    scores: np.ndarray,
    is_anomaly: np.ndarray | None,
    threshold: float,
    score_name: str,
    path: Path,
    anomaly_name: str = "held-out class",
    title: str = "",
) -> Path:
    """Histograms of the test images' scores (normal vs anomalies) and the threshold."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = np.percentile(scores, [0.5, 99.5])
    bins = np.linspace(min(lo, threshold), max(hi, threshold), 60)
    normal = scores if is_anomaly is None else scores[~is_anomaly]
    ax.hist(normal, bins=bins, alpha=0.6, density=True, label="normal test images")
    if is_anomaly is not None:
        ax.hist(scores[is_anomaly], bins=bins, alpha=0.6, density=True, label=anomaly_name)
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.1f}")
    ax.set_xlabel(f"{score_name} (nats per image)")
    ax.set_ylabel("density")
    ax.set_title(title or "anomaly scores")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_probe(
    per_draw: dict[str, dict[int, list[float]]], chance: float, path: Path
) -> Path | None:
    """Probe accuracy against labels per class: latent means vs raw pixels, with the spread."""
    if not per_draw:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, label in (("latent", "latent means"), ("pixel", "raw pixels")):
        if kind not in per_draw:
            continue
        ns = sorted(per_draw[kind])
        means = [np.mean(per_draw[kind][n]) for n in ns]
        stds = [np.std(per_draw[kind][n], ddof=1) if len(per_draw[kind][n]) > 1 else 0 for n in ns]
        ax.errorbar(ns, means, yerr=stds, marker="o", capsize=4, label=label)
    ax.axhline(chance, color="grey", linestyle=":", label=f"chance {chance:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("labelled images per class")
    ax.set_ylabel("test accuracy")
    ax.set_title("few-label probe (logistic regression; mean and std over draws)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
