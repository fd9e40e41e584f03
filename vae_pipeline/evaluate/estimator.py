"""The estimator: per-example ELBO terms, the importance-weighted bound and their summary.

Units: every ELBO component is nats per example (sum over pixels / latent dims, mean over test
examples). `elbo` is the bound itself (a log-likelihood, negative); `recon`, `kl` and `iw_nll`
are positive costs. bits/dim = iw_nll / (D ln 2), D = the real pixels times channels (the
model's `pixel_count()`: 784 for Fashion-MNIST's 28x28 padded to 32x32, whose padding the
likelihood leaves out); metrics.json records D as `pixels`. Each example draws its noise from its
own seeded stream, so the numbers do not depend on batching, sharding or ranks.
"""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import torch
import torch.distributed as dist

from vae_pipeline.binarize import TEST_STREAM
from vae_pipeline.binarize import binarize as binarize_policy
from vae_pipeline.config.sections import EvaluateConfig
from vae_pipeline.data.dataset import to_unit_float
from vae_pipeline.elbo import (
    gaussian_kl_per_dim,
    iw_log_likelihood,
    mutual_information,
    terms_from_outputs,
)
from vae_pipeline.evaluate.anomaly import complexity
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
    """recon, kl, elbo (one posterior sample) and the IW bound for every image; plus mu, logvar
    and the image's complexity L(x) and floor (nats: `evaluate.anomaly.complexity`, of the
    pixels as scored, binarized where the evaluation binarizes).

    `indices` are the images' positions in the test split (default 0..N-1); they key each
    example's RNG stream, so the values do not depend on batching or sharding.
    """
    model.eval().to(device)
    decode = model.inference_decoder()
    indices = torch.arange(len(images)) if indices is None else indices
    keys = ("recon", "kl", "elbo", "iw_log_px", "iw_ess", "mu", "logvar", "complexity", "floor")
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
        length, floor = complexity(x, model.likelihood, model.content_box)
        out["complexity"].append(torch.from_numpy(length))
        out["floor"].append(torch.from_numpy(floor))
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
