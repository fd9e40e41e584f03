"""ELBO terms in nats per example (sum over pixels and latent dims, mean over examples).

References: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Appendix B (closed-form
Gaussian KL); Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (the bound
log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vae_pipeline.model import bernoulli_log_likelihood, gaussian_log_likelihood

__all__ = [
    "bernoulli_log_likelihood",
    "gaussian_log_likelihood",
    "gaussian_kl",
    "gaussian_kl_per_dim",
    "elbo_terms",
    "iw_log_likelihood",
    "mutual_information",
    "terms_from_outputs",
]

LogLikelihood = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

LOG_2PI = math.log(2.0 * math.pi)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) per example: 0.5 * sum(mu^2 + var - 1 - logvar)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)


def gaussian_kl_per_dim(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """The KL above, kept per latent dimension: shape (batch, latent_dim)."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar)


def log_normal_diag(z: torch.Tensor, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mu, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (LOG_2PI + logvar + (z - mu).pow(2) * torch.exp(-logvar)).sum(dim=-1)


def log_standard_normal(z: torch.Tensor) -> torch.Tensor:
    return -0.5 * (LOG_2PI + z.pow(2)).sum(dim=-1)


def terms_from_outputs(
    logits: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    x: torch.Tensor,
    log_likelihood: LogLikelihood = bernoulli_log_likelihood,
) -> dict[str, torch.Tensor]:
    """One-sample ELBO per example: {"recon": -log p(x|z), "kl": KL, "elbo": log p(x|z) - KL}.

    `log_likelihood(logits, x)` is the decoder's (a model's `log_likelihood`; Bernoulli here).
    """
    log_px_z = log_likelihood(logits, x)
    kl = gaussian_kl(mu, logvar)
    return {"recon": -log_px_z, "kl": kl, "elbo": log_px_z - kl}


def elbo_terms(model, x: torch.Tensor, eps: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-example ELBO terms of `model` on `x` (one posterior sample), plus mu and logvar."""
    logits, mu, logvar = model.forward_logits(x, eps)
    terms = terms_from_outputs(logits, mu, logvar, x, model.log_likelihood)
    return {**terms, "mu": mu, "logvar": logvar}


@torch.no_grad()
def iw_log_likelihood(
    model,
    x: torch.Tensor,
    k: int,
    chunk: int = 16,
    mu_logvar=None,
    log_likelihood: LogLikelihood | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise: Callable[[int], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Importance-weighted lower bound on log p(x) per example with K posterior samples.

    log p(x) >= log (1/K) sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x)), z_k ~ q(z|x)
    (Burda et al. 2016, eq. 8). Samples are drawn `chunk` at a time and decoded in one batched
    pass; the log-mean-exp is accumulated across chunks, so memory is bounded by chunk, not K.
    `log_likelihood(decoder_output, x)` gives log p(x|z) per example (default: the model's own),
    `decode(z)` the decoder output (default: `model.decode_logits`), and `noise(n)` the standard
    normal draws for the next n samples, shape (n, batch, latent) (default: torch's global RNG).
    """
    log_likelihood = log_likelihood or model.log_likelihood
    decode = decode or model.decode_logits
    mu, logvar = mu_logvar if mu_logvar is not None else model.encode(x)
    batch = x.shape[0]
    std = torch.exp(0.5 * logvar)
    log_w_chunks = []
    done = 0
    while done < k:
        n = min(chunk, k - done)
        if noise is None:
            eps = torch.randn((n, *mu.shape), device=mu.device, dtype=mu.dtype)
        else:
            eps = noise(n).to(device=mu.device, dtype=mu.dtype)
        z = mu.unsqueeze(0) + eps * std.unsqueeze(0)  # (n, batch, latent)
        logits = decode(z.reshape(n * batch, -1))
        x_rep = x.unsqueeze(0).expand(n, *x.shape).reshape(n * batch, *x.shape[1:])
        log_px_z = log_likelihood(logits, x_rep).view(n, batch)
        log_w = log_px_z + log_standard_normal(z) - log_normal_diag(z, mu, logvar)
        log_w_chunks.append(torch.logsumexp(log_w, dim=0))
        done += n
    return torch.logsumexp(torch.stack(log_w_chunks), dim=0) - math.log(k)


@torch.no_grad()
def mutual_information(mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> float:
    """Estimate of I(x; z) under q(x, z) = p_data(x) q(z|x), from the posteriors of N examples.

    I = E[log q(z|x)] - E[log q(z)], with z_i = mu_i + sigma_i * eps_i one sample per example and
    the aggregate posterior q(z_i) ~= (1/N) sum_j q(z_i | x_j) (Hoffman & Johnson 2016; He et
    al. 2019, "Lagging inference networks"). Near 0 means posterior collapse; it cannot exceed
    log N, so use enough examples. Cost O(N^2 * D), memory bounded by row chunks.
    """
    n = mu.shape[0]
    z = mu + torch.exp(0.5 * logvar) * eps
    log_q_own = log_normal_diag(z, mu, logvar)
    # log q(z_i | x_j) for all pairs, `rows` samples at a time (memory rows x N x D)
    rows = max(1, 2**22 // max(1, n * mu.shape[1]))
    log_q_aggregate = torch.cat(
        [
            torch.logsumexp(
                log_normal_diag(z[i : i + rows].unsqueeze(1), mu.unsqueeze(0), logvar.unsqueeze(0)),
                dim=1,
            )
            for i in range(0, n, rows)
        ]
    ) - math.log(n)
    return float((log_q_own - log_q_aggregate).mean())
