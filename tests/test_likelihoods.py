"""The likelihoods a researcher compares: the discretized logistic, the padding left out of the
likelihood and of bits/dim, the IWAE objective and the importance weights' effective sample
size; each against a direct computation."""

import math

import numpy as np
import pytest
import torch
from torch.distributions import Normal

from vae_pipeline.config import build_config
from vae_pipeline.elbo import (
    discretized_logistic_log_likelihood,
    effective_sample_size,
    elbo_terms,
    iw_log_likelihood,
    iwae_terms,
)
from vae_pipeline.evaluate.estimator import per_example_terms, summarize
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.step import learning_rate

from .conftest import tiny_params


def _direct_discretized_logistic(mean: float, log_scale: float, k: int) -> float:
    """P(level k) for one pixel, by the CDF of the logistic in float64 (no log-space tricks)."""
    s = math.exp(max(log_scale, -7.0))

    def cdf(v: float) -> float:
        return 0.5 * (1.0 + math.tanh((v - mean) / s / 2))  # the logistic CDF, overflow-free

    centre = 2.0 * k / 255 - 1.0
    upper = 1.0 if k == 255 else cdf(centre + 1 / 255)
    lower = 0.0 if k == 0 else cdf(centre - 1 / 255)
    return upper - lower


@pytest.mark.parametrize(
    ("mean", "log_scale"), [(0.0, -2.0), (-0.9, -4.0), (0.7, 0.5), (1.3, -6.5), (-0.2, -9.0)]
)
def test_discretized_logistic_sums_to_one_and_matches_the_cdf(mean, log_scale):
    levels = torch.arange(256, dtype=torch.float64)
    x = (levels / 255).view(256, 1, 1, 1)
    m = torch.full_like(x, mean)
    ls = torch.full_like(x, log_scale)
    log_p = discretized_logistic_log_likelihood(m, ls, x)  # one pixel per "example"
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-6)
    direct = torch.tensor(
        [_direct_discretized_logistic(mean, log_scale, k) for k in range(256)], dtype=torch.float64
    )
    big = direct > 1e-6  # where the difference of CDFs is not cancellation noise
    torch.testing.assert_close(log_p[big].exp(), direct[big], rtol=1e-6, atol=1e-12)


def test_discretized_logistic_in_float32_sums_to_one_per_pixel_of_an_image():
    torch.manual_seed(0)
    mean, log_scale = torch.randn(1, 1, 4, 4) * 0.5, torch.randn(1, 1, 4, 4) - 3
    x = (torch.arange(256, dtype=torch.float32) / 255).view(256, 1, 1, 1).expand(256, 1, 4, 4)
    per_pixel = torch.stack(
        [
            discretized_logistic_log_likelihood(
                mean[..., i : i + 1, j : j + 1],
                log_scale[..., i : i + 1, j : j + 1],
                x[..., i : i + 1, j : j + 1],
            )
            for i in range(4)
            for j in range(4)
        ]
    )  # (16 pixels, 256 levels)
    torch.testing.assert_close(per_pixel.exp().sum(1), torch.ones(16), rtol=0, atol=1e-4)


def test_the_model_with_a_discretized_logistic_has_2c_outputs_and_a_mean_in_unit_range():
    model = ConvVAE(3, 16, 4, likelihood="discretized_logistic").eval()
    z = torch.randn(5, 4)
    assert model.decode_logits(z).shape == (5, 6, 16, 16)
    mean = model.decode(z)
    assert mean.shape == (5, 3, 16, 16) and mean.min() >= 0 and mean.max() <= 1
    x = torch.randint(0, 256, (5, 3, 16, 16)).float() / 255
    terms = elbo_terms(model, x)
    # a normalised distribution over discrete values: log P <= 0, so recon >= 0
    assert (terms["recon"] > 0).all()
    assert ConvVAE(**model.hparams()).likelihood == "discretized_logistic"


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic"])
def test_the_padding_is_outside_the_likelihood(likelihood):
    torch.manual_seed(0)
    boxed = ConvVAE(1, 32, 4, likelihood=likelihood, content_box=[2, 2, 28, 28]).eval()
    plain = ConvVAE(1, 32, 4, likelihood=likelihood).eval()
    plain.load_state_dict(boxed.state_dict())
    assert boxed.pixel_count() == 784 and plain.pixel_count() == 1024
    x = torch.rand(3, 1, 32, 32)
    out = boxed.decode_logits(torch.randn(3, 4))
    # the boxed likelihood is the whole-image one summed over the 28x28 crop only
    crop = ConvVAE(1, 28, 4, likelihood=likelihood)
    if likelihood == "gaussian":
        crop.log_sigma.data.copy_(boxed.log_sigma.data)
    expected = crop.log_likelihood(out[..., 2:30, 2:30], x[..., 2:30, 2:30])
    torch.testing.assert_close(boxed.log_likelihood(out, x), expected, rtol=1e-6, atol=1e-4)
    # padding pixels change nothing
    x2 = x.clone()
    x2[..., :2, :] = 1.0 - x2[..., :2, :]
    torch.testing.assert_close(boxed.log_likelihood(out, x2), boxed.log_likelihood(out, x))
    assert not torch.equal(plain.log_likelihood(out, x2), plain.log_likelihood(out, x))
    # pictures show the padding as padding (0)
    assert boxed.decode(torch.randn(2, 4))[..., :2, :].abs().max() == 0


def test_bits_per_dim_divides_by_the_real_pixel_count():
    cfg = build_config(tiny_params())
    rng = np.random.default_rng(0)
    terms = {
        "recon": rng.uniform(100, 200, 50),
        "kl": rng.uniform(5, 10, 50),
        "iw_log_px": -rng.uniform(100, 200, 50),
        "mu": rng.normal(size=(50, 8)),
        "logvar": rng.normal(size=(50, 8)),
    }
    terms["elbo"] = -(terms["recon"] + terms["kl"])
    metrics = summarize(terms, cfg.evaluate, 784)
    assert metrics["pixels"] == 784
    assert metrics["bits_per_dim"] == pytest.approx(
        -terms["iw_log_px"].mean() / (784 * math.log(2))
    )
    assert metrics["mutual_info_ceiling"] == pytest.approx(math.log(50))


def test_bits_per_dim_of_a_padded_model_counts_its_content_box_only():
    """A 3-channel 16x16 model whose real pixels are a 10x12 box: D = 3 * 10 * 12 = 360, not
    the padded 3 * 16 * 16 = 768; bits/dim = iw_nll / (D ln 2) from its own nats."""
    cfg = build_config(tiny_params(evaluate={"iw_samples": 4, "batch_size": 8}))
    torch.manual_seed(0)
    model = ConvVAE(3, 16, 4, content_box=[3, 2, 10, 12]).eval()
    images = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    terms = per_example_terms(model, images, cfg.evaluate, torch.device("cpu"))
    metrics = summarize(terms, cfg.evaluate, model.pixel_count(), model.likelihood)
    _, _, height, width = model.content_box
    d = 3 * height * width
    assert (model.pixel_count(), metrics["pixels"], d) == (360, 360, 360)
    nats = float(np.mean([-v for v in terms["iw_log_px"].tolist()]))  # positive nats
    assert nats > 0 and metrics["iw_nll"] == pytest.approx(nats, rel=1e-12)
    assert metrics["bits_per_dim"] == pytest.approx(nats / (d * math.log(2)), rel=1e-12)
    padded = nats / (3 * 16 * 16 * math.log(2))
    assert metrics["bits_per_dim"] != pytest.approx(padded, rel=0.1)


def _direct_iw_bound(model, x, eps, beta=1.0):
    """log (1/K) sum_k p(x|z_k) p(z_k)^beta / q(z_k|x)^beta, one example and sample at a time."""
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    out = []
    for i in range(x.shape[0]):
        log_w = []
        for k in range(eps.shape[0]):
            z = mu[i] + eps[k, i] * std[i]
            log_px = model.log_likelihood(model.decode_logits(z[None]), x[i : i + 1])[0]
            log_pz = Normal(0.0, 1.0).log_prob(z).sum()
            log_qz = Normal(mu[i], std[i]).log_prob(z).sum()
            log_w.append(log_px + beta * (log_pz - log_qz))
        out.append(torch.logsumexp(torch.stack(log_w), 0) - math.log(eps.shape[0]))
    return torch.stack(out)


@pytest.mark.parametrize("k", [1, 5])
def test_iwae_objective_matches_a_direct_computation(k):
    torch.manual_seed(0)
    model = ConvVAE(1, 16, 3).double()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    eps = torch.randn(k, 4, 3, dtype=torch.float64)
    mu, logvar = model.encode(x)
    for beta in (0.3, 1.0):  # beta < 1: the KL warm-up, inside each weight
        terms = iwae_terms(model.decode_logits, model.log_likelihood, x, mu, logvar, eps, beta)
        torch.testing.assert_close(terms["iwae"], _direct_iw_bound(model, x, eps, beta))
    # with K = 1 the bound is the one-sample ELBO (with the Monte Carlo KL) ...
    if k == 1:
        single = elbo_terms(model, x, eps[0])
        torch.testing.assert_close(terms["recon"], single["recon"])
        torch.testing.assert_close(terms["elbo"], terms["iwae"])
    # ... and the evaluation's chunked bound is the same number with the same draws
    with torch.no_grad():
        iw = iw_log_likelihood(model, x, k, chunk=2, noise=_replay(eps))
    torch.testing.assert_close(iw, terms["iwae"].detach())


def _replay(eps):
    state = {"done": 0}

    def noise(n):
        out = eps[state["done"] : state["done"] + n]
        state["done"] += n
        return out

    return noise


def test_iwae_tightens_the_elbo_on_average():
    torch.manual_seed(1)
    model = ConvVAE(1, 16, 3).double()
    x = torch.rand(6, 1, 16, 16, dtype=torch.float64)
    mu, logvar = model.encode(x)
    eps = torch.randn(64, 6, 3, dtype=torch.float64)
    terms = iwae_terms(model.decode_logits, model.log_likelihood, x, mu, logvar, eps)
    assert (terms["iwae"] >= terms["elbo"]).all()  # Jensen: log mean exp >= mean


def test_effective_sample_size_matches_the_weights():
    torch.manual_seed(0)
    log_w = torch.randn(20, 3, dtype=torch.float64) * 3
    w = log_w.exp()
    expected = w.sum(0) ** 2 / (w**2).sum(0)
    got = effective_sample_size(torch.logsumexp(log_w, 0), torch.logsumexp(2 * log_w, 0))
    torch.testing.assert_close(got, expected)
    equal = torch.zeros(20, 1, dtype=torch.float64)
    assert effective_sample_size(
        torch.logsumexp(equal, 0), torch.logsumexp(2 * equal, 0)
    ).item() == pytest.approx(20)
    # the evaluation's chunked ESS is that of its K weights
    model = ConvVAE(1, 16, 3).double().eval()
    x = torch.rand(4, 1, 16, 16, dtype=torch.float64)
    eps = torch.randn(10, 4, 3, dtype=torch.float64)
    with torch.no_grad():
        _, ess = iw_log_likelihood(model, x, 10, chunk=3, noise=_replay(eps), with_ess=True)
        mu, logvar = model.encode(x)
        z = mu + eps * torch.exp(0.5 * logvar)
        log_px = torch.stack([model.log_likelihood(model.decode_logits(zk), x) for zk in z])
        lw = (
            log_px
            + Normal(0.0, 1.0).log_prob(z).sum(-1)
            - Normal(mu, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
        )
    w = (lw - lw.max(0).values).exp()
    torch.testing.assert_close(ess, w.sum(0) ** 2 / (w**2).sum(0))
    assert (ess >= 1 - 1e-9).all() and (ess <= 10 + 1e-9).all()


def _ess_by_loop(log_w: list[list[float]]) -> list[float]:
    """Kish's ESS of each example's K log-weights (log_w[k][n]), normalised by the largest:
    1 / sum_k wn_k^2 with wn = w / sum w."""
    out = []
    for n in range(len(log_w[0])):
        column = [row[n] for row in log_w]
        top = max(column)
        w = [math.exp(v - top) for v in column]
        out.append(1.0 / sum((v / sum(w)) ** 2 for v in w))
    return out


def test_effective_sample_size_of_weights_far_from_one_is_that_of_the_normalised_weights():
    """log-weights of -500 .. -400 (and shifted by +1000) give the same finite ESS, in [1, K]:
    exp of them underflows (w^2: exp(-800) is 0 even in float64) and overflows shifted."""
    k, n = 12, 5
    gen = torch.Generator().manual_seed(0)
    log_w = -500.0 + 100.0 * torch.rand(k, n, dtype=torch.float64, generator=gen)
    log_w[:, 0] = -450.0  # all equal: ESS = K
    log_w[0, 1] = -400.0  # one weight dominates (the others < e^-40 of it): ESS = 1
    log_w[1:, 1] = -500.0 + torch.rand(k - 1, dtype=torch.float64, generator=gen)
    expected = _ess_by_loop(log_w.tolist())
    for shift in (0.0, 1000.0):
        shifted = log_w + shift
        got = effective_sample_size(torch.logsumexp(shifted, 0), torch.logsumexp(2 * shifted, 0))
        assert torch.isfinite(got).all(), shift
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    assert expected[0] == pytest.approx(k) and expected[1] == pytest.approx(1.0)
    assert all(1 - 1e-9 <= e <= k + 1e-9 for e in expected) and max(expected[2:]) > 1.5

    # the evaluation's chunked ESS, with log p(x|z) near -450 nats: the same, by a plain loop
    latent = 2
    mu = torch.tensor([[0.3, -0.2], [1.0, 0.5], [-0.7, 0.1]], dtype=torch.float64)
    logvar = torch.tensor([[-0.5, 0.2], [0.0, -1.0], [0.4, 0.3]], dtype=torch.float64)
    eps = torch.randn(k, 3, latent, dtype=torch.float64, generator=gen)
    x = torch.zeros(3, 1, dtype=torch.float64)

    def log_px(offset):
        return lambda z, x_rep: offset + 1.5 * z.sum(-1)

    def log_normal(v, m, s):
        return -0.5 * ((v - m) / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

    by_loop = [[0.0] * 3 for _ in range(k)]
    for kk in range(k):
        for i in range(3):
            lw = -450.0
            for j in range(latent):
                m, s = mu[i, j].item(), math.exp(0.5 * logvar[i, j].item())
                z = m + eps[kk, i, j].item() * s
                lw += 1.5 * z + log_normal(z, 0.0, 1.0) - log_normal(z, m, s)
            by_loop[kk][i] = lw
    for offset in (-450.0, 550.0):
        _, ess = iw_log_likelihood(
            None,
            x,
            k,
            chunk=5,
            mu_logvar=(mu, logvar),
            log_likelihood=log_px(offset),
            decode=lambda z: z,
            noise=_replay(eps),
            with_ess=True,
        )
        assert torch.isfinite(ess).all(), offset
        np.testing.assert_allclose(ess.numpy(), _ess_by_loop(by_loop), rtol=1e-9)
        assert ((ess >= 1 - 1e-9) & (ess <= k + 1e-9)).all()


def test_cosine_learning_rate_runs_from_lr_to_lr_min():
    cfg = build_config(tiny_params(train={"lr_schedule": "cosine", "lr": 1e-3, "lr_min": 1e-5}))
    tc = cfg.train
    assert learning_rate(tc, 0, 101) == pytest.approx(1e-3)
    assert learning_rate(tc, 50, 101) == pytest.approx((1e-3 + 1e-5) / 2)
    assert learning_rate(tc, 100, 101) == pytest.approx(1e-5)
    constant = build_config(tiny_params()).train
    assert learning_rate(constant, 77, 101) == constant.lr


def test_a_learning_rate_above_the_warm_up_start_rises_to_it_linearly():
    cfg = build_config(tiny_params(train={"lr": 1e-2, "lr_warmup_steps": 100}))
    tc = cfg.train
    assert tc.lr_warmup_start == 1e-3
    assert learning_rate(tc, 0, 1000) == pytest.approx(1e-3)  # Adam's first step, at the start
    assert learning_rate(tc, 50, 1000) == pytest.approx(1e-3 + 0.5 * 9e-3)
    assert learning_rate(tc, 100, 1000) == learning_rate(tc, 900, 1000) == 1e-2
    default = build_config(tiny_params()).train  # lr 1e-3: no warm-up, step 0 included
    assert [learning_rate(default, s, 1000) for s in (0, 1, 99)] == [1e-3] * 3
    cosine = build_config(
        tiny_params(train={"lr": 1e-2, "lr_schedule": "cosine", "lr_warmup_steps": 10})
    ).train
    target = cosine.lr_min + 0.5 * (1e-2 - cosine.lr_min) * (1 + math.cos(math.pi * 5 / 99))
    assert learning_rate(cosine, 5, 100) == pytest.approx(1e-3 + (target - 1e-3) * 0.5)


def test_active_units_count_the_variance_of_the_posterior_means_across_examples():
    # Burda et al. 2016: unit u is active when Cov_x(E_q[z_u]) > 0.01. A unit whose mean is
    # large but the same for every image carries nothing; one that varies does.
    cfg = build_config(tiny_params())
    rng = np.random.default_rng(0)
    n = 400
    mu = np.stack(
        [
            np.full(n, 5.0),  # large constant mean: inactive
            rng.normal(0.0, 1.0, n),  # variance 1: active
            rng.normal(3.0, 0.02, n),  # variance 0.0004: inactive
            rng.normal(-2.0, 0.5, n),  # variance 0.25: active
        ],
        axis=1,
    )
    terms = {
        "recon": np.ones(n),
        "kl": np.ones(n),
        "elbo": -2 * np.ones(n),
        "iw_log_px": -2 * np.ones(n),
        "mu": mu,
        "logvar": np.zeros_like(mu),
    }
    metrics = summarize(terms, cfg.evaluate, 784)
    by_hand = sum(1 for u in range(4) if np.mean((mu[:, u] - mu[:, u].mean()) ** 2) > 0.01)
    assert metrics["active_units"] == by_hand == 2
    # KL per unit in closed form, by hand: 0.5 (mu^2 + var - 1 - log var), var = 1 here
    np.testing.assert_allclose(metrics["kl_per_dim"], 0.5 * (mu**2).mean(axis=0), rtol=1e-12)


# bf16 autocast and the likelihood head. A sharp decoder at 1x32x32 (1,024 pixels): its last
# layer scaled up, and small scales (Gaussian sigma e^-4.75, about 2.2 levels of 255; the
# logistic's scale e^-4, its std about 4 bins of 2/255), on 8-bit data it fits (its own mean,
# quantized). Measured on 48 images (3 weight seeds): the whole decoder in bf16 (the head too)
# misses fp32 by 1.41 (Gaussian) and 1.18 (discretized logistic) nats per image on average, at
# most 2.42 and 2.45; the head in fp32, by 0.20 and 0.22, at most 0.45 and 0.63: what is left
# is the bf16 of the layers below the head. The Bernoulli loses 0.002 even in bf16.
BF16_MEAN_NATS = 0.5  # per image, averaged over the images
BF16_MAX_NATS = 1.0  # per image, each image
SHARP = {"bernoulli": (10.0, None), "gaussian": (4.0, -4.75), "discretized_logistic": (4.0, -4.0)}


def _sharp_decoder(likelihood: str, seed: int) -> ConvVAE:
    """A 1x32x32 ConvVAE whose likelihood head is sharpened (SHARP: the head's scale, and the
    log sigma or log scale)."""
    torch.manual_seed(seed)
    model = ConvVAE(1, 32, 8, likelihood).eval()
    head = model.decoder[-1]
    scale, log_scale = SHARP[likelihood]
    with torch.no_grad():
        if likelihood == "discretized_logistic":  # channel 0: the mean; 1: the log scale
            head.weight[:, :1] *= scale
            head.bias[:1] *= scale
            head.weight[:, 1:] *= 0.1
            head.bias[1:] = log_scale
        else:
            head.weight *= scale
            head.bias *= scale
        if likelihood == "gaussian":
            model.log_sigma.fill_(log_scale)
    return model


def _whole_decoder(model: ConvVAE, z: torch.Tensor) -> torch.Tensor:
    """decode_logits as it was before its head ran in fp32: one Sequential, all under autocast."""
    return model.decoder(model.decoder_input(z))


def _log_likelihood(model: ConvVAE, decode, z: torch.Tensor, x: torch.Tensor, bf16: bool):
    """log p(x|z) per image, the decoder under bf16 autocast or not; the likelihood itself in
    fp32 from the decoder's output, as the training step computes it."""
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = decode(z)
    return model.log_likelihood(out.float(), x)


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic"])
def test_bf16_autocast_log_likelihood_agrees_with_fp32(likelihood):
    gaps, whole_gaps = [], []
    for seed in range(3):
        model = _sharp_decoder(likelihood, seed)
        z = torch.randn(16, 8, generator=torch.Generator().manual_seed(100 + seed))
        with torch.no_grad():
            x = torch.round(model.decode(z) * 255) / 255
        fp32 = _log_likelihood(model, model.decode_logits, z, x, bf16=False)
        gaps.append((_log_likelihood(model, model.decode_logits, z, x, bf16=True) - fp32).abs())
        whole = _log_likelihood(model, lambda z, m=model: _whole_decoder(m, z), z, x, bf16=True)
        whole_gaps.append((whole - fp32).abs())
    gap, whole_gap = torch.cat(gaps), torch.cat(whole_gaps)
    assert gap.mean() <= BF16_MEAN_NATS and gap.max() <= BF16_MAX_NATS, (gap.mean(), gap.max())
    if likelihood != "bernoulli":  # the Bernoulli's logits lose nothing measurable either way
        # not vacuous: with its head in bf16 the same decoder misses the bound, 5-7x further
        assert whole_gap.max() > BF16_MAX_NATS
        assert whole_gap.mean() > 3 * gap.mean()


@pytest.mark.parametrize("likelihood", ["bernoulli", "discretized_logistic"])
def test_under_autocast_the_head_runs_in_fp32_and_the_layers_below_in_bf16(likelihood):
    model = _sharp_decoder(likelihood, 0)
    body_out = []
    hook = model.decoder[-2].register_forward_hook(lambda m, i, o: body_out.append(o))
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.decode_logits(z)
    hook.remove()
    assert body_out[0].dtype == torch.bfloat16 and out.dtype == torch.float32
    with torch.no_grad():  # the head in fp32 on the bf16 activations, by hand
        assert torch.equal(out, model.decoder[-1](body_out[0].float()))


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian", "discretized_logistic"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_decode_logits_in_fp32_is_the_whole_decoder_bit_for_bit(likelihood, memory_format):
    """Outside autocast the fp32 head changes nothing: output and gradients equal to the
    decoder as one Sequential (what decode_logits was), at an odd size (output_padding)."""
    torch.manual_seed(0)
    model = ConvVAE(3, 37, 5, likelihood).to(memory_format=memory_format)
    z = torch.randn(4, 5, requires_grad=True)
    params = [z, *model.decoder_input.parameters(), *model.decoder.parameters()]
    new, old = model.decode_logits(z), _whole_decoder(model, z)
    assert new.dtype == torch.float32 and torch.equal(new, old)
    weights = torch.randn(new.shape, generator=torch.Generator().manual_seed(1))
    for a, b in zip(
        torch.autograd.grad((new * weights).sum(), params),
        torch.autograd.grad((old * weights).sum(), params),
        strict=True,
    ):
        assert torch.equal(a, b)
