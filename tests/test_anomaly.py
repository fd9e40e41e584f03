"""The anomaly scores: the complexity L(x) against a sequential coder written out and a hand
count, the corrected and two-sided scores, and their calibration."""

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from vae_pipeline.evaluate import anomaly


def _kt_coder_nats(bits: np.ndarray) -> float:
    """An adaptive binary coder, one pixel at a time in raster order: each pixel's context is
    its W, NW, N, NE neighbours (0 off the image), its probability of a 1 the KT estimate
    (ones + 1/2) / (seen + 1) of that context so far; returns the total -log P in nats (what an
    arithmetic coder spends, within 2 bits)."""
    h, w = bits.shape
    counts: dict[int, list[int]] = {}

    def at(y: int, x: int) -> int:
        return int(bits[y, x]) if 0 <= y < h and 0 <= x < w else 0

    total = 0.0
    for y in range(h):
        for x in range(w):
            ctx = at(y, x - 1) | at(y - 1, x - 1) << 1 | at(y - 1, x) << 2 | at(y - 1, x + 1) << 3
            zeros, ones = counts.setdefault(ctx, [0, 0])
            p_one = (ones + 0.5) / (zeros + ones + 1)
            total -= math.log(p_one if bits[y, x] else 1 - p_one)
            counts[ctx][int(bits[y, x])] += 1
    return total


def test_the_context_code_length_is_what_a_sequential_kt_coder_spends():
    rng = np.random.default_rng(0)
    images = np.stack(
        [
            rng.random((1, 12, 10)) < 0.5,  # noise: about a bit a pixel
            np.zeros((1, 12, 10), bool),  # black: next to nothing
            np.pad(np.ones((1, 6, 4), bool), ((0, 0), (3, 3), (3, 3))),  # a block
            rng.random((1, 12, 10)) < 0.1,
        ]
    ).astype(np.float64)
    got = anomaly.context_code_length(images)
    want = [_kt_coder_nats(image[0] > 0.5) for image in images]
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert got[0] > 0.9 * 120 * math.log(2)  # noise is incompressible
    assert got[1] < 4.0  # black: -log of the KT probability of 120 zeros, about 2.9 nats
    assert got[1] == pytest.approx(
        -math.log(math.gamma(120.5) / (math.sqrt(math.pi) * math.factorial(120))), rel=1e-9
    )


def test_channels_are_coded_apart_and_intensities_count_softly():
    grey = np.full((1, 2, 8, 8), 0.5)
    one_channel = anomaly.context_code_length(grey[:, :1])
    assert anomaly.context_code_length(grey)[0] == pytest.approx(2 * one_channel[0])
    # 64 pixels of intensity 0.5 in one context: n1 = 32 soft ones, n0 = 32
    expected = math.lgamma(65) + math.log(math.pi) - 2 * math.lgamma(32.5)
    assert one_channel[0] == pytest.approx(expected, rel=1e-12)
    # about a bit a pixel, plus the estimator's learning cost (about log n)
    assert 64 * math.log(2) < one_channel[0] < 64 * math.log(2) + math.log(64)


def test_complexity_counts_the_likelihoods_pixels_only():
    x = torch.zeros(2, 1, 32, 32)
    x[1, :, :2] = torch.rand(1, 2, 32) > 0.5  # noise in the padding rows only
    box = (2, 2, 28, 28)
    inside, floor = anomaly.complexity(x, "bernoulli", box)
    assert inside[0] == pytest.approx(inside[1])  # the padding costs nothing
    assert anomaly.complexity(x, "bernoulli")[0][1] > inside[1] + 20
    np.testing.assert_array_equal(floor, [0.0, 0.0])  # binary pixels: no floor


def test_the_floor_is_the_entropy_of_each_intensity_as_a_bernoulli_target():
    x = torch.tensor([0.0, 0.25, 0.5, 1.0]).repeat(1, 1, 2, 1)  # (1, 1, 2, 4)
    _, floor = anomaly.complexity(x, "bernoulli")
    h = [0.0, -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2), 0.0]
    assert floor[0] == pytest.approx(2 * sum(h), rel=1e-12)
    # the least binary cross-entropy any prediction reaches: at p = x
    p = torch.rand(2000, 1, 2, 4)
    bce = torch.nn.functional.binary_cross_entropy(p, x.expand_as(p), reduction="none")
    assert bce.flatten(1).sum(1).min().item() >= floor[0] - 1e-6


def test_the_8_bit_likelihoods_use_the_png_length():
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (2, 1, 16, 16)).astype(np.float64) / 255
    x[1] = 0.25
    got, floor = anomaly.complexity(x, "discretized_logistic")
    for image, nats in zip(x, got, strict=True):
        buffer = io.BytesIO()
        pixels = np.round(image[0] * 255).astype(np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=9)
        assert nats == pytest.approx(8 * len(buffer.getvalue()) * math.log(2))
    assert got[0] > 8 * 256 * math.log(2) > got[1]  # noise: at least a byte a pixel
    np.testing.assert_array_equal(floor, [0.0, 0.0])


def _terms(nll, length, floor):
    return {
        "iw_log_px": -np.asarray(nll, float),
        "elbo": -np.asarray(nll, float) - 10.0,
        "complexity": np.asarray(length, float),
        "floor": np.asarray(floor, float),
    }


def test_each_score_from_the_terms():
    terms = _terms([100.0, 250.0, 400.0], [500.0, 300.0, 380.0], [80.0, 200.0, 0.0])
    np.testing.assert_array_equal(anomaly.anomaly_scores(terms, "iw_nll"), [100, 250, 400])
    np.testing.assert_array_equal(anomaly.anomaly_scores(terms, "neg_elbo"), [110, 260, 410])
    np.testing.assert_array_equal(anomaly.anomaly_scores(terms, "complexity"), [-400, -50, 20])
    stats = anomaly.statistics(terms)
    np.testing.assert_array_equal(stats["structure"], [420, 100, 380])
    with pytest.raises(ValueError, match="reference"):
        anomaly.anomaly_scores(terms, "typicality")
    with pytest.raises(ValueError, match="one of"):
        anomaly.anomaly_scores(terms, "likelihood")


def test_a_tail_probability_matches_the_kernel_estimate_by_quadrature():
    rng = np.random.default_rng(3)
    ref = rng.normal(0.0, 1.0, 300)
    width = anomaly.bandwidth(ref)
    grid = np.linspace(-12, 12, 200001)
    density = np.exp(-0.5 * ((grid[:, None] - ref) / width) ** 2).sum(1)
    density /= density.sum()
    for v in (-3.0, -0.2, 0.4, 2.5):
        lower = density[grid <= v].sum()
        want = math.log(min(lower, 1 - lower))
        assert anomaly.log_tail(np.array([v]), ref, width)[0] == pytest.approx(want, abs=2e-3)


def test_typicality_flags_every_tail_and_keeps_the_calibrated_rate():
    rng = np.random.default_rng(2)
    n = 10000
    nll = rng.normal(240.0, 30.0, n)
    floor = rng.normal(180.0, 40.0, n)
    length = floor + rng.normal(80.0, 15.0, n)
    terms = _terms(nll, length, floor)
    cal = {k: v[:4000] for k, v in terms.items()}
    threshold, reference = anomaly.calibrate(cal, "typicality", 99.0)
    assert set(reference["values"]) == set(anomaly.STATISTICS)
    assert len(reference["values"]["nll"]) == 2000  # every other image; the others calibrate
    fresh = anomaly.anomaly_scores({k: v[4000:] for k, v in terms.items()}, "typicality", reference)
    assert (fresh > threshold).mean() == pytest.approx(0.01, abs=0.004)
    # each statistic's two tails alone: too likely, too unlikely, too smooth, too rough, and a
    # likelihood too good (bad) for the image's complexity
    odd = _terms(
        [120.0, 380.0, 240.0, 240.0, 240.0, 240.0],
        [260.0, 260.0, 190.0, 340.0, 60.0, 500.0],
        [180.0, 180.0, 180.0, 180.0, 0.0, 420.0],
    )
    scores = anomaly.anomaly_scores(odd, "typicality", reference)
    assert (scores > threshold).all(), scores
    typical = anomaly.anomaly_scores(_terms([240.0], [260.0], [180.0]), "typicality", reference)
    assert typical[0] < threshold
    threshold, reference = anomaly.calibrate(cal, "iw_nll", 99.0)
    assert reference is None and threshold == pytest.approx(np.percentile(nll[:4000], 99))
