"""ELBO terms against independent computations (torch.distributions, closed forms, plain loops)."""

import math

import torch
from torch.distributions import Normal, kl_divergence

from vae_pipeline.elbo import (
    bernoulli_log_likelihood,
    elbo_terms,
    gaussian_kl,
    iw_log_likelihood,
    log_normal_diag,
)
from vae_pipeline.model import ConvVAE


def test_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    expected = kl_divergence(
        Normal(mu, torch.exp(0.5 * logvar)), Normal(torch.zeros_like(mu), torch.ones_like(mu))
    ).sum(1)
    torch.testing.assert_close(gaussian_kl(mu, logvar), expected)
    assert torch.all(gaussian_kl(torch.zeros(3, 4), torch.zeros(3, 4)) == 0)


def test_bernoulli_log_likelihood_matches_the_plain_formula():
    torch.manual_seed(1)
    logits = torch.randn(4, 1, 6, 6, dtype=torch.float64) * 3
    x = torch.rand(4, 1, 6, 6, dtype=torch.float64)
    p = torch.sigmoid(logits)
    expected = (x * torch.log(p) + (1 - x) * torch.log1p(-p)).flatten(1).sum(1)
    torch.testing.assert_close(bernoulli_log_likelihood(logits, x), expected)


def test_bernoulli_is_stable_for_saturated_logits():
    logits = torch.tensor([[100.0, -100.0]])
    x = torch.tensor([[1.0, 0.0]])
    assert torch.isfinite(bernoulli_log_likelihood(logits, x)).all()
    assert bernoulli_log_likelihood(logits, x).item() > -1e-6


def test_log_normal_diag_matches_torch_distributions():
    z, mu, logvar = torch.randn(3, 4), torch.randn(3, 4), torch.randn(3, 4)
    expected = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal_diag(z, mu, logvar), expected)


def test_elbo_is_recon_plus_kl_per_example():
    torch.manual_seed(2)
    model = ConvVAE(1, 16, 3)
    x = torch.rand(5, 1, 16, 16)
    terms = elbo_terms(model, x)
    torch.testing.assert_close(terms["elbo"], -(terms["recon"] + terms["kl"]))
    assert terms["elbo"].shape == (5,)


def test_iw_bound_with_k1_equals_elbo_in_expectation():
    torch.manual_seed(3)
    model = ConvVAE(1, 16, 3).eval()
    x = torch.rand(1, 1, 16, 16).expand(4000, -1, -1, -1)
    with torch.no_grad():
        iw = iw_log_likelihood(model, x, k=1)
        elbo = elbo_terms(model, x)["elbo"]
    se = math.sqrt(iw.var() / len(iw) + elbo.var() / len(elbo))
    assert abs(iw.mean() - elbo.mean()) < 4 * se


def test_iw_chunks_give_the_same_estimate_as_one_pass():
    model = ConvVAE(1, 16, 3).eval()
    x = torch.rand(3, 1, 16, 16)
    torch.manual_seed(4)
    chunked = iw_log_likelihood(model, x, k=12, chunk=5)
    # Plain reference loop over samples, in float64.
    with torch.no_grad():
        mu, logvar = model.encode(x)
        torch.manual_seed(4)  # the draws the chunked loop made, in the same order
        parts = [torch.randn(5, 3, 3), torch.randn(5, 3, 3), torch.randn(2, 3, 3)]
        eps = torch.cat(parts)
        logw = []
        for k in range(12):
            z = mu + eps[k] * torch.exp(0.5 * logvar)
            lw = (
                bernoulli_log_likelihood(model.decode_logits(z), x)
                + Normal(0.0, 1.0).log_prob(z).sum(-1)
                - Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
            )
            logw.append(lw.double())
        expected = torch.logsumexp(torch.stack(logw), 0) - math.log(12)
    torch.testing.assert_close(chunked.double(), expected, rtol=1e-5, atol=1e-3)
