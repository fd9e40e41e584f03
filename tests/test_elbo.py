"""ELBO terms against independent computations (torch.distributions, closed forms, plain loops)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vae_pipeline.elbo import (
    bernoulli_log_likelihood,
    elbo_terms,
    gaussian_kl,
    gaussian_log_likelihood,
    iw_log_likelihood,
    log_normal_diag,
    log_standard_normal,
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


def test_gaussian_log_likelihood_is_the_normalised_density():
    torch.manual_seed(2)
    mean, x = (
        torch.rand(4, 1, 5, 5, dtype=torch.float64),
        torch.rand(4, 1, 5, 5, dtype=torch.float64),
    )
    for log_sigma in (-2.0, 0.0, 0.7):
        sigma = math.exp(log_sigma)
        expected = Normal(mean, sigma).log_prob(x).flatten(1).sum(1)
        got = gaussian_log_likelihood(mean, torch.tensor(log_sigma, dtype=torch.float64), x)
        torch.testing.assert_close(got, expected)
    # The floor keeps a collapsing sigma finite: below it, the density is that of the floor.
    floored = gaussian_log_likelihood(mean, torch.tensor(-50.0, dtype=torch.float64), x)
    torch.testing.assert_close(floored, Normal(mean, math.exp(-6.0)).log_prob(x).flatten(1).sum(1))


def test_gaussian_model_elbo_uses_its_sigma():
    torch.manual_seed(3)
    model = ConvVAE(1, 16, 3, likelihood="gaussian").eval()
    with torch.no_grad():
        model.log_sigma.fill_(-1.5)
    x, eps = torch.rand(5, 1, 16, 16), torch.randn(5, 3)
    with torch.no_grad():
        terms = elbo_terms(model, x, eps)
        mu, logvar = model.encode(x)
        mean = model.decode(mu + eps * torch.exp(0.5 * logvar))
    expected = -Normal(mean.double(), math.exp(-1.5)).log_prob(x.double()).flatten(1).sum(1)
    torch.testing.assert_close(terms["recon"].double(), expected, rtol=1e-5, atol=1e-3)
    # The IW bound defaults to the model's own likelihood: with K=1 and the same draw it is the
    # one-sample weight log p(x|z) + log p(z) - log q(z|x) (the ELBO with a sampled KL).
    z = mu + eps * torch.exp(0.5 * logvar)
    log_w = -terms["recon"] + log_standard_normal(z) - log_normal_diag(z, mu, logvar)
    iw = iw_log_likelihood(model, x, 1, noise=lambda n: eps.unsqueeze(0))
    torch.testing.assert_close(iw, log_w, rtol=1e-5, atol=1e-4)


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


class LinearGaussianVAE(torch.nn.Module):
    """p(z) = N(0, I), p(x|z) = N(Wz + b, s^2 I), so p(x) = N(b, W W^T + s^2 I) exactly.

    `posterior_scale` = 1 gives the exact posterior q(z|x) = p(z|x); other values a wrong one.
    """

    def __init__(self, d: int = 6, latent: int = 3, s: float = 0.5, posterior_scale: float = 1.0):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w = torch.randn(d, latent, generator=gen, dtype=torch.float64)
        self.b = torch.randn(d, generator=gen, dtype=torch.float64)
        self.s = s
        self.scale = posterior_scale
        precision = torch.eye(latent, dtype=torch.float64) + self.w.T @ self.w / s**2
        self.post_cov = torch.linalg.inv(precision)

    def encode(self, x):
        mu = (x - self.b) @ self.w @ self.post_cov.T / self.s**2
        var = torch.diagonal(self.post_cov) * self.scale  # diagonal part of the posterior
        return mu * self.scale, var.log().expand_as(mu)

    def decode_logits(self, z):  # here: the mean of p(x|z)
        return z @ self.w.T + self.b

    def log_likelihood(self, mean, x):
        return torch.distributions.Normal(mean, self.s).log_prob(x).sum(dim=-1)

    def exact_log_px(self, x):
        cov = self.w @ self.w.T + self.s**2 * torch.eye(len(self.b), dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def test_iw_bound_on_a_linear_gaussian_model_approaches_the_exact_log_likelihood():
    model = LinearGaussianVAE(posterior_scale=0.8)  # a deliberately poor posterior
    torch.manual_seed(0)
    x = torch.distributions.MultivariateNormal(
        model.b, model.w @ model.w.T + 0.25 * torch.eye(6, dtype=torch.float64)
    ).sample(
        (200,),
    )
    exact = model.exact_log_px(x).mean().item()
    bounds = {}
    for k in (1, 10, 100, 2000):
        torch.manual_seed(k)
        iw = iw_log_likelihood(model, x, k, chunk=500, log_likelihood=model.log_likelihood)
        bounds[k] = iw.mean().item()
    # Monotone in K (Burda et al. 2016, Theorem 1) and never above log p(x) beyond MC error.
    assert bounds[1] < bounds[10] < bounds[100] < bounds[2000]
    assert bounds[2000] <= exact + 0.01
    assert exact - bounds[2000] < 0.05 * (exact - bounds[1])  # the gap closes as K grows


def test_iw_bound_with_the_exact_posterior_is_exact_for_any_k():
    # With a diagonal exact posterior every importance weight equals p(x): log-mean-exp of
    # identical values is exact, so even K = 1 gives log p(x) up to float error.
    model = LinearGaussianVAE(d=4, latent=2, s=0.7)
    model.w = torch.tensor([[1.5, 0.0], [0.0, -0.8], [0.0, 0.0], [0.0, 0.0]], dtype=torch.float64)
    model.post_cov = torch.linalg.inv(
        torch.eye(2, dtype=torch.float64) + model.w.T @ model.w / 0.49
    )
    x = torch.randn(50, 4, dtype=torch.float64)
    for k in (1, 7):
        iw = iw_log_likelihood(model, x, k, chunk=3, log_likelihood=model.log_likelihood)
        torch.testing.assert_close(iw, model.exact_log_px(x), rtol=0, atol=1e-9)


def test_mutual_information_of_a_gaussian_channel_matches_the_closed_form():
    # x ~ N(0, 1), q(z|x) = N(a x, s^2): I(x; z) = 0.5 log(1 + a^2 / s^2).
    from vae_pipeline.elbo import mutual_information

    gen = torch.Generator().manual_seed(0)
    n, a, s = 4000, 2.0, 0.5
    x = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    mu, logvar = a * x, torch.full((n, 1), math.log(s**2), dtype=torch.float64)
    eps = torch.randn(n, 1, generator=gen, dtype=torch.float64)
    exact = 0.5 * math.log(1 + a**2 / s**2)
    assert mutual_information(mu, logvar, eps) == pytest.approx(exact, abs=0.05)


def test_mutual_information_is_zero_when_the_posterior_ignores_x():
    from vae_pipeline.elbo import mutual_information

    gen = torch.Generator().manual_seed(0)
    mu = torch.full((500, 4), 0.3, dtype=torch.float64)
    logvar = torch.zeros(500, 4, dtype=torch.float64)
    eps = torch.randn(500, 4, generator=gen, dtype=torch.float64)
    assert mutual_information(mu, logvar, eps) == pytest.approx(0.0, abs=1e-12)
