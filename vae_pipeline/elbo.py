"""ELBO terms in nats per example (sum over pixels and latent dims, mean over examples).

References: Kingma & Welling 2014, "Auto-Encoding Variational Bayes", Appendix B (closed-form
Gaussian KL); Burda, Grosse & Salakhutdinov 2016, "Importance Weighted Autoencoders" (the bound
log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)]).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vae_pipeline.model import (
    bernoulli_log_likelihood,
    discretized_logistic_log_likelihood,
    gaussian_log_likelihood,
)

__all__ = [
    "bernoulli_log_likelihood",
    "discretized_logistic_log_likelihood",
    "gaussian_log_likelihood",
    "effective_sample_size",
    "iwae_terms",
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


def iwae_terms(
    decode_logits: Callable[[torch.Tensor], torch.Tensor],
    log_likelihood: LogLikelihood,
    x: torch.Tensor,
    mu: torch.Tensor,
    logvar: torch.Tensor,
    eps: torch.Tensor,
    beta: float = 1.0,
) -> dict[str, torch.Tensor]:
    """The importance-weighted training objective per example (Burda et al. 2016, eq. 8) from
    K posterior samples z_k = mu + sigma * eps[k], eps of shape (K, batch, latent):

        iwae = log (1/K) sum_k exp(log p(x|z_k) + beta (log p(z_k) - log q(z_k|x)))

    (beta < 1 is the KL warm-up, applied inside each weight). Also returned, for reporting:
    recon = mean_k -log p(x|z_k), kl = mean_k log q(z_k|x) - log p(z_k) (the Monte Carlo KL)
    and elbo = -(recon + kl), the K-sample average of the single-sample ELBO.

    Differentiable (a training loss); `iw_log_likelihood` is the no-grad, chunked evaluation
    of the same bound."""
    k, batch = eps.shape[0], x.shape[0]
    z = mu.unsqueeze(0) + eps * torch.exp(0.5 * logvar).unsqueeze(0)  # (K, batch, latent)
    logits = decode_logits(z.reshape(k * batch, -1))
    x_rep = x.unsqueeze(0).expand(k, *x.shape).reshape(k * batch, *x.shape[1:])
    log_px_z = log_likelihood(logits.float(), x_rep).view(k, batch)
    z = z.float()
    log_prior_ratio = log_standard_normal(z) - log_normal_diag(z, mu.float(), logvar.float())
    log_w = log_px_z + beta * log_prior_ratio
    recon, kl = -log_px_z.mean(dim=0), -log_prior_ratio.mean(dim=0)
    return {
        "iwae": torch.logsumexp(log_w, dim=0) - math.log(k),
        "recon": recon,
        "kl": kl,
        "elbo": -(recon + kl),
    }


def effective_sample_size(log_w_sum: torch.Tensor, log_w2_sum: torch.Tensor) -> torch.Tensor:
    """Kish's effective sample size of importance weights, (sum w)^2 / sum w^2, from
    log sum w and log sum w^2: between 1 (one weight dominates) and K (all equal)."""
    return torch.exp(2.0 * log_w_sum - log_w2_sum)


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
    with_ess: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Importance-weighted lower bound on log p(x) per example with K posterior samples.

    log p(x) >= log (1/K) sum_k exp(log p(x|z_k) + log p(z_k) - log q(z_k|x)), z_k ~ q(z|x)
    (Burda et al. 2016, eq. 8). Samples are drawn `chunk` at a time and decoded in one batched
    pass; the log-mean-exp is accumulated across chunks, so memory is bounded by chunk, not K.
    `log_likelihood(decoder_output, x)` gives log p(x|z) per example (default: the model's own),
    `decode(z)` the decoder output (default: `model.decode_logits`), and `noise(n)` the standard
    normal draws for the next n samples, shape (n, batch, latent) (default: torch's global RNG).
    With `with_ess`, also the effective sample size of the K importance weights per example
    (`effective_sample_size`): near K the bound has converged, near 1 it rests on one sample.
    """
    log_likelihood = log_likelihood or model.log_likelihood
    decode = decode or model.decode_logits
    mu, logvar = mu_logvar if mu_logvar is not None else model.encode(x)
    batch = x.shape[0]
    std = torch.exp(0.5 * logvar)
    log_w_chunks, log_w2_chunks = [], []
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
        if with_ess:
            log_w2_chunks.append(torch.logsumexp(2.0 * log_w, dim=0))
        done += n
    log_w_sum = torch.logsumexp(torch.stack(log_w_chunks), dim=0)
    bound = log_w_sum - math.log(k)
    if not with_ess:
        return bound
    return bound, effective_sample_size(log_w_sum, torch.logsumexp(torch.stack(log_w2_chunks), 0))


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
