"""The evaluation's pictures: reconstructions, prior samples, interpolation, traversal, KL per
latent dimension, the loss curves, and the downstream tasks' (latent PCA, anomaly scores,
the few-label probe)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
from torchvision.utils import save_image

from vae_pipeline.config.sections import EvaluateConfig
from vae_pipeline.data.dataset import to_unit_float
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def save_grids(
    model: ConvVAE, images: torch.Tensor, ecfg: EvaluateConfig, out_dir: Path, device: torch.device
) -> dict[str, Path]:
    """recon.png: test inputs (odd rows) over their reconstructions (even rows);
    samples.png: decoder means of z ~ N(0, I)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval().to(device)
    n = min(32, len(images))
    x = to_unit_float(images[:n].to(device))
    mu, _ = model.encode(x)
    recon = model.decode(mu)
    rows = []
    for start in range(0, n, 8):
        rows += [x[start : start + 8], recon[start : start + 8]]
    paths = {"recon": out_dir / "recon.png", "samples": out_dir / "samples.png"}
    save_image(_upscale(torch.cat(rows)), paths["recon"], nrow=8, padding=2, pad_value=0.5)
    gen = torch.Generator().manual_seed(ecfg.seed)
    z = torch.randn(ecfg.n_samples, model.latent_dim, generator=gen).to(device)
    samples = model.decode(z)
    save_image(
        _upscale(samples),
        paths["samples"],
        nrow=int(math.sqrt(ecfg.n_samples)) or 1,
        padding=2,
        pad_value=0.5,
    )
    return paths


@torch.no_grad()
def save_latent_pictures(
    model: ConvVAE,
    images: torch.Tensor,
    kl_dims: np.ndarray,
    out_dir: Path,
    device: torch.device,
    steps: int = 9,
) -> dict[str, Path]:
    """interpolation.png: decoded straight lines between the latent means of test-image pairs
    (rows; inputs at both ends); traversal.png: one row per most-informative unit (by KL),
    that unit swept over -3..3 around the first test image's latent mean."""
    model.eval().to(device)
    x = to_unit_float(images[: min(8, len(images))].to(device))
    mu, _ = model.encode(x)
    t = torch.linspace(0, 1, steps, device=device).view(1, steps, 1)
    pairs = max(1, len(mu) // 2)
    start, end = mu[:pairs], mu[pairs : 2 * pairs] if len(mu) > 1 else mu[:1]
    path = start.unsqueeze(1) * (1 - t) + end.unsqueeze(1) * t  # (pairs, steps, latent)
    decoded = model.decode(path.reshape(-1, mu.shape[1])).view(pairs, steps, *x.shape[1:])
    ends_a, ends_b = x[:pairs].unsqueeze(1), x[pairs : 2 * pairs].unsqueeze(1)
    if len(mu) == 1:
        ends_b = ends_a
    rows = torch.cat([ends_a, decoded, ends_b], dim=1).reshape(-1, *x.shape[1:])
    paths = {"interpolation": out_dir / "interpolation.png", "traversal": out_dir / "traversal.png"}
    save_image(_upscale(rows), paths["interpolation"], nrow=steps + 2, padding=2, pad_value=0.5)
    units = np.argsort(-kl_dims)[: min(8, len(kl_dims))]
    values = torch.linspace(-3, 3, steps, device=device)
    z = mu[:1].repeat(len(units) * steps, 1)
    for row, unit in enumerate(units):
        z[row * steps : (row + 1) * steps, int(unit)] = values
    save_image(_upscale(model.decode(z)), paths["traversal"], nrow=steps, padding=2, pad_value=0.5)
    return paths


def plot_kl_per_dim(kl_dims: np.ndarray, threshold_units: int, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, len(kl_dims) * 0.2 + 2), 3.5))
    ax.bar(range(len(kl_dims)), kl_dims, color="tab:blue")
    ax.set_xlabel("latent unit")
    ax.set_ylabel("KL (nats per example)")
    ax.set_title(f"KL per latent unit ({threshold_units} active)")
    ax.grid(axis="y", alpha=0.3)
    _save(plt, fig, path)
    return path


def _upscale(x: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscaling of tiny images so the grids are readable."""
    factor = max(1, min_side // x.shape[-1])
    return (
        torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x
    )


def plot_loss_curves(history: list[dict], path: Path) -> Path | None:
    if not history:
        return None
    from matplotlib.ticker import MaxNLocator

    plt = _pyplot()

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train -ELBO")
    if all("val_loss" in h for h in history):
        ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val -ELBO")
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("nats per example")
    ax.set_title("ConvVAE loss")
    ax.grid(alpha=0.3)
    ax.legend()
    _save(plt, fig, path)
    return path


def plot_latent_pca(
    xy: np.ndarray,
    labels: np.ndarray,
    label_names: list[str],
    path: Path,
    holdout: int | None = None,
    title: str = "latent means, first two principal components",
) -> Path:
    """Scatter of the latent means' first two principal components (`xy`, from
    `downstream.project`), one colour per label."""
    plt = _pyplot()
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
    _save(plt, fig, path)
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
    from vae_pipeline.evaluate.anomaly import UNITS

    ax.set_xlabel(f"{score_name} ({UNITS.get(score_name, 'nats')} per image)")
    ax.set_ylabel("density")
    ax.set_title(title or "anomaly scores")
    ax.legend(fontsize=8)
    _save(plt, fig, path)
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
    _save(plt, fig, path)
    return path
