"""The gate's rule: paired bootstrap bound, margins, finiteness and the collapse guard."""

import math

import numpy as np
import pytest

from vae_pipeline.config.sections import PromotionConfig
from vae_pipeline.registry.gate import bootstrap_mean_upper_bound, check_floors, decide


def test_bootstrap_bound_matches_a_plain_reference_loop():
    diff = np.random.default_rng(1).normal(0.3, 2.0, size=300)
    rng = np.random.default_rng(7)
    means = []
    for _ in range(1000):  # one resample at a time, the textbook way
        sample = [diff[rng.integers(0, len(diff))] for _ in range(len(diff))]
        means.append(sum(sample) / len(sample))
    expected = float(np.quantile(means, 0.95))
    assert bootstrap_mean_upper_bound(diff, 0.95, 1000, seed=7) == pytest.approx(expected, 1e-12)


def test_bootstrap_bound_agrees_with_the_normal_approximation():
    # For a mean of many i.i.d. differences the bootstrap quantile approaches
    # mean + z_0.95 * sd / sqrt(n) (central limit theorem).
    diff = np.random.default_rng(2).normal(-0.5, 3.0, size=5000)
    closed_form = diff.mean() + 1.6448536 * diff.std(ddof=1) / math.sqrt(len(diff))
    bound = bootstrap_mean_upper_bound(diff, 0.95, 4000, seed=0)
    assert bound == pytest.approx(closed_form, abs=0.1 * diff.std() / math.sqrt(len(diff)))


def test_bootstrap_needs_paired_values():
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap_mean_upper_bound(np.array([1.0]), 0.95, 100, 0)


def _pcfg(**kw) -> PromotionConfig:
    return PromotionConfig(bootstrap_samples=1000, **kw)


def test_first_model_is_promoted():
    result = decide(np.full(10, 300.0), None, active_units=5, pcfg=_pcfg())
    assert result.promoted and result.reason == "no champion yet"


def test_clearly_better_candidate_is_promoted_and_the_bound_is_reported():
    rng = np.random.default_rng(0)
    champion = rng.normal(300, 20, size=2000)
    candidate = champion - 1.0 + rng.normal(0, 1, size=2000)  # 1 nat better, per example
    result = decide(candidate, champion, active_units=5, pcfg=_pcfg())
    assert result.promoted and result.reason.startswith("better")
    assert result.mean_diff == pytest.approx((candidate - champion).mean())
    assert result.mean_diff < result.upper_bound < 0


def test_lower_mean_within_noise_is_not_promoted():
    # The candidate's mean is lower, but the paired differences are noise around ~0: a mean
    # comparison would promote it, the bootstrap bound does not.
    rng = np.random.default_rng(0)
    champion = rng.normal(300, 20, size=500)
    candidate = champion + rng.normal(0, 5, size=500)
    candidate -= (candidate - champion).mean() + 0.05  # mean difference exactly -0.05
    result = decide(candidate, champion, active_units=5, pcfg=_pcfg())
    assert candidate.mean() < champion.mean()
    assert not result.promoted and result.reason.startswith("not better")
    assert result.upper_bound > 0


def test_identical_models_are_not_promoted():
    values = np.random.default_rng(0).normal(300, 20, size=100)
    result = decide(values.copy(), values, active_units=5, pcfg=_pcfg())
    assert not result.promoted and result.upper_bound == 0.0
    assert "needs < +0.000" in result.reason


@pytest.mark.parametrize(("margin", "promoted"), [(0.0, True), (0.5, True), (2.0, False)])
def test_candidate_must_beat_the_champion_by_the_margin(margin, promoted):
    rng = np.random.default_rng(0)
    champion = rng.normal(300, 20, size=2000)
    candidate = champion - 1.0 + rng.normal(0, 0.5, size=2000)
    result = decide(candidate, champion, 5, _pcfg(min_improvement_nats=margin))
    assert result.promoted is promoted


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_candidate_is_never_promoted(bad):
    candidate = np.full(10, 100.0)
    candidate[3] = bad
    result = decide(candidate, None, active_units=5, pcfg=_pcfg())
    assert not result.promoted and "not finite (1 of 10 examples)" in result.reason


def test_posterior_collapse_guard():
    result = decide(np.full(10, 1.0), np.full(10, 500.0), 0, _pcfg(min_active_units=2))
    assert not result.promoted
    assert "0 active units < promotion.min_active_units=2" in result.reason


def test_unpaired_test_sets_are_refused():
    with pytest.raises(ValueError, match="cannot be paired"):
        decide(np.ones(10), np.ones(11), 5, _pcfg())


def test_floors_allow_up_to_the_given_worsening_in_each_metric_direction():
    pcfg = _pcfg(floors={"anomaly_auroc": 0.01, "sample_fd": 2.0, "probe_latent_acc_n10": 0.0})
    champion = {"anomaly_auroc": 0.9, "sample_fd": 10.0, "probe_latent_acc_n10": 0.6}
    ok, notes = check_floors(
        {"anomaly_auroc": 0.891, "sample_fd": 11.9, "probe_latent_acc_n10": 0.6},
        champion,
        pcfg,
        [10],
    )
    assert ok and len(notes) == 3
    # AUROC is higher-better, sample_fd lower-better: each fails on its own side.
    ok, notes = check_floors({**champion, "anomaly_auroc": 0.88}, champion, pcfg, [10])
    assert not ok and "anomaly_auroc 0.88 vs champion 0.9: worse by 0.02" in notes[0]
    ok, notes = check_floors({**champion, "sample_fd": 12.5}, champion, pcfg, [10])
    assert not ok and any("sample_fd 12.5 vs champion 10: worse by 2.5" in n for n in notes)
    ok, _ = check_floors(
        {**champion, "sample_fd": 1.0, "anomaly_auroc": 0.99}, champion, pcfg, [10]
    )
    assert ok  # better is always fine
    # Not measured on one side: reported, never blocking; no champion: nothing to compare.
    ok, notes = check_floors({"sample_fd": 10.0}, champion, pcfg, [10])
    assert ok and "anomaly_auroc not compared (the candidate has no value measured alike)" in notes
    assert check_floors({}, None, pcfg, [10]) == (True, [])
