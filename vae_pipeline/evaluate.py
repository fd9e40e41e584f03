"""Evaluation on the held-out test split: ELBO components, the IW bound, pictures, metrics JSON.

Units: every ELBO component is nats per example (sum over pixels / latent dims, mean over test
examples). `elbo` is the bound itself (a log-likelihood, negative); `recon`, `kl` and `iw_nll`
are positive costs. bits/dim = iw_nll / (D ln 2), D = the real pixels times channels (the
model's `pixel_count()`: 784 for Fashion-MNIST's 28x28 padded to 32x32, whose padding the
likelihood leaves out); metrics.json records D as `pixels`.
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

from vae_pipeline import uses
from vae_pipeline.binarize import TEST_STREAM
from vae_pipeline.binarize import binarize as binarize_policy
from vae_pipeline.config import Config, EvaluateConfig
from vae_pipeline.data.dataset import PreparedSplit, resolve_label, to_unit_float
from vae_pipeline.data.placement import resident_decision
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
# streams; 3: padding outside the likelihood, hash-keyed dynamic binarization); part of the
# registry's eval_key, so older evaluations are re-run, never paired.
EVAL_PROTOCOL = 3
PROGRESS_EVERY_S = 30.0


def _stderr(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan


def example_generators(seed: int, indices: torch.Tensor) -> list[torch.Generator]:
    """One RNG stream per test example, keyed by (evaluate.seed, the example's index in the test
    split): an example's noise is the same whatever the batch size, shard or rank computes it."""
    return [torch.Generator().manual_seed(seed * 2**32 + int(i)) for i in indices]


def binarize(
    x: torch.Tensor, ecfg: EvaluateConfig, indices: torch.Tensor | None = None
) -> torch.Tensor:
    """`evaluate.binarize`: none (as is), fixed (x > 0.5) or dynamic (one Bernoulli draw per
    pixel, keyed by evaluate.seed and each example's index: `vae_pipeline.binarize`)."""
    policy = "none" if ecfg.binarize == "auto" else ecfg.binarize
    return binarize_policy(x, policy, ecfg.seed, TEST_STREAM, indices)


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
    keys = ("recon", "kl", "elbo", "iw_log_px", "iw_ess", "mu", "logvar")
    out: dict[str, list] = {k: [] for k in keys}
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
        rows = indices[start : start + ecfg.batch_size]
        gens = example_generators(ecfg.seed, rows)
        x = to_unit_float(images[start : start + ecfg.batch_size].to(device))
        x = binarize(x, ecfg, rows)
        mu, logvar = model.encode(x)
        eps = _normal(gens, (mu.shape[1],), 0).to(device=device, dtype=mu.dtype)
        z = model.reparameterize(mu, logvar, eps)
        terms = terms_from_outputs(decode(z), mu, logvar, x, model.log_likelihood)
        iw, ess = iw_log_likelihood(
            model,
            x,
            ecfg.iw_samples,
            ecfg.iw_chunk,
            (mu, logvar),
            decode=decode,
            noise=lambda n, gens=gens, d=mu.shape[1]: _normal(gens, (n, d), 1),
            with_ess=True,
        )
        for key in ("recon", "kl", "elbo"):
            out[key].append(terms[key].double().cpu())
        out["iw_log_px"].append(iw.double().cpu())
        out["iw_ess"].append(ess.double().cpu())
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
    """Metrics (means over examples) and their standard errors. `dims` is D of bits/dim: the
    real pixels times channels (`ConvVAE.pixel_count()`)."""
    iw_nll = -terms["iw_log_px"]
    mi_n = min(len(iw_nll), ecfg.mi_examples)
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
        # the estimate cannot exceed log N: near it, the number says "at least this much"
        "mutual_info_ceiling": math.log(mi_n) if mi_n > 0 else math.nan,
        "mutual_info_examples": int(mi_n),
        "iw_k": ecfg.iw_samples,
        "pixels": int(dims),
        "binarize": ecfg.binarize,
        "likelihood": likelihood,
        "eval_seed": ecfg.seed,
        "eval_protocol": EVAL_PROTOCOL,
        "n_examples": int(len(iw_nll)),
    }
    if "iw_ess" in terms and len(terms["iw_ess"]):
        ess = terms["iw_ess"]
        metrics.update(
            iw_ess_mean=float(ess.mean()),
            iw_ess_median=float(np.median(ess)),
            iw_ess_min=float(ess.min()),
        )
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


# --- the uses: anomaly detection, few-label probe, sample quality ------------------------------


def anomaly_scores(terms: dict[str, np.ndarray], score: str) -> np.ndarray:
    """Per-image anomaly score in nats (higher = more anomalous): anomaly.score's quantity."""
    return -terms["iw_log_px"] if score == "iw_nll" else -terms["elbo"]


def _seeded_subset(n: int, size: int, seed: int) -> np.ndarray:
    """`size` of range(n) (all when n <= size), seeded, in increasing order."""
    if n <= size:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=size, replace=False))


@torch.no_grad()
def encode_means(
    model: ConvVAE, images: torch.Tensor, device: torch.device, batch: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """(mu, logvar) of q(z|x) for uint8 images, as float64 arrays."""
    model.eval().to(device)
    mus, logvars = [], []
    for start in range(0, len(images), batch):
        mu, logvar = model.encode(to_unit_float(images[start : start + batch].to(device)))
        mus.append(mu.double().cpu())
        logvars.append(logvar.double().cpu())
    if not mus:
        return np.zeros((0, model.latent_dim)), np.zeros((0, model.latent_dim))
    return torch.cat(mus).numpy(), torch.cat(logvars).numpy()


@torch.no_grad()
def prior_samples(
    model: ConvVAE, n: int, seed: int, device: torch.device, temperature: float = 1.0
) -> torch.Tensor:
    """Decoder means of z ~ N(0, temperature^2 I), in [0, 1] (seeded)."""
    model.eval().to(device)
    z = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    out = [model.decode((z[i : i + 512] * temperature).to(device)) for i in range(0, n, 512)]
    return torch.cat(out).cpu() if out else torch.zeros(0)


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


def summary_markdown(metrics: dict) -> str:
    """The evaluation as a Markdown table (a Prefect artifact, a PR comment, the run's notes)."""
    rows = [
        ("ELBO", "elbo", "nats/example"),
        ("reconstruction", "recon", "nats/example"),
        ("KL", "kl", "nats/example"),
        (f"IW NLL (K={metrics.get('iw_k')})", "iw_nll", "nats/example"),
        (f"bits/dim (D = {metrics.get('pixels')})", "bits_per_dim", "bits"),
        (
            f"mutual information I(x;z) (ceiling log N = {metrics.get('mutual_info_ceiling', 0):.2f})",
            "mutual_info",
            "nats",
        ),
        ("active units", "active_units", "units"),
    ]
    if "iw_ess_mean" in metrics:
        rows.insert(4, ("IW effective sample size, mean (min)", "iw_ess_mean", "samples"))
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
        if key == "iw_ess_mean":
            shown = f"min {metrics['iw_ess_min']:.3g}"
        lines.append(f"| {label} | {value:.4g} | {shown} | {unit} |")
    lines += uses_markdown(metrics)
    return "\n".join(lines) + "\n"


def uses_markdown(metrics: dict) -> list[str]:
    """The uses' section of summary.md: anomaly detection, few-label probe, sample quality."""
    if "anomaly_threshold" not in metrics:
        return []
    m = metrics
    held = m.get("holdout_class")
    lines = ["", "**Uses**", "", "| use | metric | value |", "|---|---|---|"]
    if "anomaly_auroc" in m:
        lines += [
            f"| anomaly detection (held-out class `{held}`) | AUROC | {m['anomaly_auroc']:.3f} |",
            f"| | AUPRC (anomalies are {m['anomaly_fraction']:.1%}) | {m['anomaly_auprc']:.3f} |",
            f"| | anomalies flagged at the threshold | {m['anomaly_recall']:.1%} |",
        ]
    lines += [
        f"| anomaly threshold | {m['anomaly_score']} > "
        f"p{m['anomaly_threshold_percentile']:g} of validation | {m['anomaly_threshold']:.2f} nats |",
        f"| | normal test images flagged | {m['anomaly_flag_rate_normal']:.1%} |",
    ]
    for n in sorted(
        int(k.removeprefix("probe_latent_acc_n"))
        for k in m
        if k.startswith("probe_latent_acc_n") and not k.endswith("_std")
    ):
        lat, pix = f"probe_latent_acc_n{n}", f"probe_pixel_acc_n{n}"
        lines.append(
            f"| few-label probe, {n} labels/class | accuracy: latent means vs raw pixels "
            f"(chance {m['probe_chance']:.2f}) | {m[lat]:.3f} ± {m[lat + '_std']:.3f} vs "
            f"{m[pix]:.3f} ± {m[pix + '_std']:.3f} |"
        )
    if "sample_fd" in m:
        lines.append(
            f"| generation ({m['sample_fd_images']} samples) | sample_fd (real images: "
            f"{m['sample_fd_reference']:.3g}) | {m['sample_fd']:.3g} |"
        )
    return lines


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
    # the same data path as training: the split copied to the device once when it fits
    resident, _ = resident_decision(cfg.train.resident_data, images.nbytes, device)
    terms = sharded_terms(model, images.to(device) if resident else images, cfg.evaluate, device)
    dims = model.pixel_count()
    metrics = summarize(terms, cfg.evaluate, dims, model.likelihood)
    metrics["data_version"] = test.manifest.get("data_version", "unversioned")
    metrics["eval_seconds"] = time.perf_counter() - t0
    if not _is_main():
        return metrics
    reports = workdir / cfg.evaluate.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    metrics.update(measure_uses(cfg, model, test, images, terms, workdir, device, reports))
    metrics["uses_key"] = uses_key(cfg, metrics["holdout_class"])
    metrics["uses_seconds"] = time.perf_counter() - t1
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
        "test: elbo %.2f  recon %.2f  kl %.2f  iw_nll(K=%d) %.2f  %.4f bits/dim (D=%d)  "
        "IW ESS mean %.1f min %.2f  %d active units  (%d images, %.1f s)",
        metrics["elbo"],
        metrics["recon"],
        metrics["kl"],
        metrics["iw_k"],
        metrics["iw_nll"],
        metrics["bits_per_dim"],
        metrics["pixels"],
        metrics.get("iw_ess_mean", math.nan),
        metrics.get("iw_ess_min", math.nan),
        metrics["active_units"],
        metrics["n_examples"],
        metrics["eval_seconds"],
    )
    log.info("uses (%.1f s):\n%s", metrics["uses_seconds"], "\n".join(uses_markdown(metrics)[3:]))
    return metrics
