"""Evaluation on the held-out test split: ELBO components, the IW bound, pictures, metrics JSON.

Units: every ELBO component is nats per example (sum over pixels / latent dims, mean over test
examples). `elbo` is the bound itself (a log-likelihood, negative); `recon`, `kl` and `iw_nll`
are positive costs. bits/dim = iw_nll / (D ln 2), D = C*H*W.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torchvision.utils import save_image

from vae_pipeline.config import Config, EvaluateConfig
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.elbo import (
    gaussian_kl_per_dim,
    iw_log_likelihood,
    mutual_information,
    terms_from_outputs,
)
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)

METRIC_KEYS = ("elbo", "recon", "kl", "iw_nll", "bits_per_dim", "active_units")
# Bumped when the same settings would give different per-example numbers (2: per-example RNG
# streams); part of the registry's eval_key, so older evaluations are re-run, never paired.
EVAL_PROTOCOL = 2
PROGRESS_EVERY_S = 30.0


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def example_generators(seed: int, indices: torch.Tensor) -> list[torch.Generator]:
    """One RNG stream per test example, keyed by (evaluate.seed, the example's index in the test
    split): an example's noise is the same whatever the batch size, shard or rank computes it."""
    return [torch.Generator().manual_seed(seed * 2**32 + int(i)) for i in indices]


def binarize(
    x: torch.Tensor, ecfg: EvaluateConfig, generators: list[torch.Generator] | None = None
) -> torch.Tensor:
    """`evaluate.binarize`: none (as is), fixed (x > 0.5) or dynamic (one Bernoulli draw per
    pixel, from each example's own stream when `generators` is given)."""
    if ecfg.binarize == "fixed":
        return (x > 0.5).to(x.dtype)
    if ecfg.binarize == "dynamic":
        if generators is None:
            return torch.bernoulli(x)
        draws = [
            torch.bernoulli(row.cpu(), generator=g) for row, g in zip(x, generators, strict=True)
        ]
        return torch.stack(draws).to(x.device)
    return x


def _normal(generators: list[torch.Generator], shape: tuple[int, ...], dim: int) -> torch.Tensor:
    """Standard normal draws, one tensor of `shape` per example's stream, stacked at `dim`."""
    return torch.stack([torch.randn(shape, generator=g) for g in generators], dim=dim)


def shard(n: int, rank: int, world_size: int) -> range:
    """The contiguous block of `n` test examples that rank `rank` of `world_size` evaluates."""
    return range(n * rank // world_size, n * (rank + 1) // world_size)


@torch.no_grad()
def per_example_terms(
    model: ConvVAE,
    images: torch.Tensor,
    ecfg: EvaluateConfig,
    device: torch.device,
    indices: torch.Tensor | None = None,
) -> dict[str, np.ndarray]:
    """recon, kl, elbo (one posterior sample) and the IW bound for every image; plus mu, logvar.

    `indices` are the images' positions in the test split (default 0..N-1); they key each
    example's RNG stream, so the values do not depend on batching or sharding.
    """
    model.eval().to(device)
    decode = model.inference_decoder()
    indices = torch.arange(len(images)) if indices is None else indices
    out: dict[str, list] = {k: [] for k in ("recon", "kl", "elbo", "iw_log_px", "mu", "logvar")}
    t0 = last = time.perf_counter()
    for start in range(0, len(images), ecfg.batch_size):
        now = time.perf_counter()
        if start and now - last >= PROGRESS_EVERY_S:  # long evaluations show progress
            last = now
            rate = start / (now - t0)
            log.info(
                "evaluated %d/%d test images (K=%d): %.1f images/s, about %.0f min left",
                start,
                len(images),
                ecfg.iw_samples,
                rate,
                (len(images) - start) / rate / 60,
            )
        gens = example_generators(ecfg.seed, indices[start : start + ecfg.batch_size])
        x = to_unit_float(images[start : start + ecfg.batch_size].to(device))
        x = binarize(x, ecfg, gens)
        mu, logvar = model.encode(x)
        eps = _normal(gens, (mu.shape[1],), 0).to(device=device, dtype=mu.dtype)
        z = model.reparameterize(mu, logvar, eps)
        terms = terms_from_outputs(decode(z), mu, logvar, x, model.log_likelihood)
        iw = iw_log_likelihood(
            model,
            x,
            ecfg.iw_samples,
            ecfg.iw_chunk,
            (mu, logvar),
            decode=decode,
            noise=lambda n, gens=gens, d=mu.shape[1]: _normal(gens, (n, d), 1),
        )
        for key in ("recon", "kl", "elbo"):
            out[key].append(terms[key].double().cpu())
        out["iw_log_px"].append(iw.double().cpu())
        out["mu"].append(mu.double().cpu())
        out["logvar"].append(logvar.double().cpu())
    if not out["mu"]:
        return {k: np.zeros((0, model.latent_dim) if k in ("mu", "logvar") else 0) for k in out}
    return {k: torch.cat(v).numpy() for k, v in out.items()}


def sharded_terms(
    model: ConvVAE, images: torch.Tensor, ecfg: EvaluateConfig, device: torch.device
) -> dict[str, np.ndarray]:
    """`per_example_terms` over all images; inside a torchrun process group each rank computes
    its `shard` and every rank gets the whole result, in test-split order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return per_example_terms(model, images, ecfg, device)
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = shard(len(images), rank, world)
    mine = per_example_terms(
        model, images[rows.start : rows.stop], ecfg, device, torch.arange(rows.start, rows.stop)
    )
    parts: list = [None] * world
    dist.all_gather_object(parts, mine)
    return {k: np.concatenate([p[k] for p in parts]) for k in mine}


def per_example_metrics(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The promotion metrics per test example (lower is better), in test-split order."""
    return {"iw_nll": -terms["iw_log_px"], "elbo_nll": -terms["elbo"]}


def kl_per_dim(terms: dict[str, np.ndarray]) -> np.ndarray:
    """Mean KL(q(z_u|x) || N(0, 1)) over test examples, per latent unit u (nats)."""
    mu, logvar = (torch.from_numpy(terms[k]) for k in ("mu", "logvar"))
    return gaussian_kl_per_dim(mu, logvar).mean(dim=0).numpy()


def mutual_info(terms: dict[str, np.ndarray], ecfg: EvaluateConfig) -> float:
    """I(x; z) estimate (nats) on up to `evaluate.mi_examples` test examples (seeded subset)."""
    mu, logvar = (torch.from_numpy(terms[k]) for k in ("mu", "logvar"))
    gen = torch.Generator().manual_seed(ecfg.seed)
    if len(mu) > ecfg.mi_examples:
        keep = torch.randperm(len(mu), generator=gen)[: ecfg.mi_examples]
        mu, logvar = mu[keep], logvar[keep]
    eps = torch.randn(mu.shape, generator=gen, dtype=mu.dtype)
    return mutual_information(mu, logvar, eps)


def summarize(
    terms: dict[str, np.ndarray], ecfg: EvaluateConfig, dims: int, likelihood: str = "bernoulli"
) -> dict:
    """Metrics (means over examples) and their standard errors."""
    iw_nll = -terms["iw_log_px"]
    mu_var = terms["mu"].var(axis=0, ddof=0)  # Cov_x(E_q[z_u]) for each unit u
    metrics = {
        "elbo": float(terms["elbo"].mean()),
        "recon": float(terms["recon"].mean()),
        "kl": float(terms["kl"].mean()),
        "iw_nll": float(iw_nll.mean()),
        "bits_per_dim": float(iw_nll.mean() / (dims * math.log(2))),
        "active_units": int((mu_var > ecfg.active_unit_threshold).sum()),
        "elbo_stderr": _stderr(terms["elbo"]),
        "recon_stderr": _stderr(terms["recon"]),
        "kl_stderr": _stderr(terms["kl"]),
        "iw_nll_stderr": _stderr(iw_nll),
        "kl_per_dim": [float(v) for v in kl_per_dim(terms)],
        "mutual_info": mutual_info(terms, ecfg),
        "iw_k": ecfg.iw_samples,
        "binarize": ecfg.binarize,
        "likelihood": likelihood,
        "eval_seed": ecfg.seed,
        "eval_protocol": EVAL_PROTOCOL,
        "n_examples": int(len(iw_nll)),
    }
    return metrics


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(4, len(kl_dims) * 0.2 + 2), 3.5))
    ax.bar(range(len(kl_dims)), kl_dims, color="tab:blue")
    ax.set_xlabel("latent unit")
    ax.set_ylabel("KL (nats per example)")
    ax.set_title(f"KL per latent unit ({threshold_units} active)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def summary_markdown(metrics: dict) -> str:
    """The evaluation as a Markdown table (a Prefect artifact, a PR comment, the run's notes)."""
    rows = [
        ("ELBO", "elbo", "nats/example"),
        ("reconstruction", "recon", "nats/example"),
        ("KL", "kl", "nats/example"),
        (f"IW NLL (K={metrics.get('iw_k')})", "iw_nll", "nats/example"),
        ("bits/dim", "bits_per_dim", "bits"),
        ("mutual information I(x;z)", "mutual_info", "nats"),
        ("active units", "active_units", "units"),
    ]
    lines = [
        f"Test data version `{metrics.get('data_version')}`, {metrics.get('n_examples')} images, "
        f"{metrics.get('likelihood', 'bernoulli')} likelihood, "
        f"binarize `{metrics.get('binarize')}`, seed {metrics.get('eval_seed')}.",
        "",
        "| metric | value | stderr | unit |",
        "|---|---|---|---|",
    ]
    for label, key, unit in rows:
        stderr = metrics.get(f"{key}_stderr")
        shown = f"{stderr:.3g}" if isinstance(stderr, float) and math.isfinite(stderr) else ""
        value = metrics[key]
        lines.append(f"| {label} | {value:.4g} | {shown} | {unit} |")
    return "\n".join(lines) + "\n"


def _upscale(x: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """Nearest-neighbour upscaling of tiny images so the grids are readable."""
    factor = max(1, min_side // x.shape[-1])
    return (
        torch.nn.functional.interpolate(x, scale_factor=factor, mode="nearest") if factor > 1 else x
    )


def plot_loss_curves(history: list[dict], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

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
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate(
    cfg: Config,
    model: ConvVAE,
    workdir: Path = Path("."),
    history: list[dict] | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Evaluate on the prepared test split; write reports/metrics.json, per-example values,
    summary.md and the pictures (recon, samples, interpolation, traversal, kl_per_dim, loss).

    Inside a torchrun process group the examples are sharded over the ranks (same numbers as
    one process) and global rank 0 alone writes the files; every rank returns the metrics.
    """
    test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    images = test.tensor()
    t0 = time.perf_counter()
    terms = sharded_terms(model, images, cfg.evaluate, device)
    dims = int(np.prod(images.shape[1:]))
    metrics = summarize(terms, cfg.evaluate, dims, model.likelihood)
    metrics["data_version"] = test.manifest.get("data_version", "unversioned")
    metrics["eval_seconds"] = time.perf_counter() - t0
    if not _is_main():
        return metrics
    reports = workdir / cfg.evaluate.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, values in per_example_metrics(terms).items():
        np.save(reports / f"per_example_{key}.npy", values)
    save_grids(model, images, cfg.evaluate, reports, device)
    kl_dims = np.asarray(metrics["kl_per_dim"])
    save_latent_pictures(model, images, kl_dims, reports, device)
    plot_kl_per_dim(kl_dims, metrics["active_units"], reports / "kl_per_dim.png")
    (reports / "summary.md").write_text(summary_markdown(metrics))
    if history:
        plot_loss_curves(history, reports / "loss_curve.png")
    log.info(
        "test: elbo %.2f  recon %.2f  kl %.2f  iw_nll(K=%d) %.2f  %.4f bits/dim  %d active units"
        "  (%d images, %.1f s)",
        metrics["elbo"],
        metrics["recon"],
        metrics["kl"],
        metrics["iw_k"],
        metrics["iw_nll"],
        metrics["bits_per_dim"],
        metrics["active_units"],
        metrics["n_examples"],
        metrics["eval_seconds"],
    )
    return metrics
