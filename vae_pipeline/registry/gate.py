"""The promotion gate's rule, as pure functions over per-example test metrics.

A candidate replaces the champion only when, on the same test examples:
  1. its metrics are finite;
  2. it has at least `promotion.min_active_units` active latent units (posterior-collapse guard);
  3. the paired difference d_i = candidate_i - champion_i (per-example `iw_nll`, nats; lower is
     better) has a one-sided bootstrap upper confidence bound (level `promotion.confidence`)
     below -`promotion.min_improvement_nats`: the candidate is better by more than the margin,
     and that is not noise of this particular test set;
  4. (`check_floors`) none of the uses' metrics named in `promotion.floors` (AUROC, probe
     accuracy, sample_fd) is worse than the champion's by more than its allowed amount.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from vae_pipeline.config.sections import PromotionConfig, floor_metrics

RESAMPLES_PER_CHUNK = 256


def bootstrap_mean_upper_bound(
    diff: np.ndarray, confidence: float, n_resamples: int, seed: int
) -> float:
    """Percentile-bootstrap upper bound of mean(diff) at one-sided level `confidence`.

    Resamples the examples with replacement `n_resamples` times (chunked, so memory stays at
    RESAMPLES_PER_CHUNK x n indices) and returns the `confidence` quantile of the resampled means.
    """
    diff = np.asarray(diff, dtype=np.float64)
    if diff.ndim != 1 or len(diff) < 2:
        raise ValueError(f"need a 1-D array of at least 2 paired differences, got {diff.shape}")
    rng = np.random.default_rng(seed)
    means = np.empty(n_resamples)
    n = len(diff)
    for start in range(0, n_resamples, RESAMPLES_PER_CHUNK):
        stop = min(start + RESAMPLES_PER_CHUNK, n_resamples)
        idx = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[idx].mean(axis=1)
    return float(np.quantile(means, confidence))


@dataclass(frozen=True)
class GateResult:
    promoted: bool
    reason: str
    candidate_value: float
    champion_value: float | None = None
    mean_diff: float | None = None
    upper_bound: float | None = None


def decide(
    candidate: np.ndarray,
    champion: np.ndarray | None,
    active_units: int,
    pcfg: PromotionConfig,
) -> GateResult:
    """Apply the rule above. `candidate`/`champion`: per-example metric on the same test examples,
    in the same order; `champion` is None when there is no champion yet."""
    candidate = np.asarray(candidate, dtype=np.float64)
    value = float(candidate.mean()) if len(candidate) else math.nan
    metric = pcfg.metric
    if len(candidate) == 0 or not np.isfinite(candidate).all():
        bad = int((~np.isfinite(candidate)).sum())
        return GateResult(
            False, f"candidate {metric} is not finite ({bad} of {len(candidate)} examples)", value
        )
    if active_units < pcfg.min_active_units:
        return GateResult(
            False,
            f"posterior collapse guard: {active_units} active units < "
            f"promotion.min_active_units={pcfg.min_active_units}",
            value,
        )
    if champion is None:
        return GateResult(True, "no champion yet", value)
    champion = np.asarray(champion, dtype=np.float64)
    if champion.shape != candidate.shape:
        raise ValueError(
            f"candidate and champion were scored on different test sets "
            f"({len(candidate)} vs {len(champion)} examples): they cannot be paired"
        )
    champ_value = float(champion.mean())
    diff = candidate - champion
    mean_diff = float(diff.mean())
    if not np.isfinite(champion).all():
        # A broken champion is replaced by any healthy candidate.
        return GateResult(True, "champion's metric is not finite", value, champ_value)
    threshold = -pcfg.min_improvement_nats + 0.0  # + 0.0: no "-0.000" in the reason
    upper = bootstrap_mean_upper_bound(
        diff, pcfg.confidence, pcfg.bootstrap_samples, pcfg.bootstrap_seed
    )
    level = f"{pcfg.confidence:.0%}"
    summary = (
        f"{metric} {value:.3f} vs champion {champ_value:.3f}: paired mean difference "
        f"{mean_diff:+.3f} nats, {level} upper bound {upper:+.3f}"
    )
    if upper < threshold:
        return GateResult(True, f"better: {summary}", value, champ_value, mean_diff, upper)
    return GateResult(
        False,
        f"not better: {summary} (needs < {threshold:+.3f})",
        value,
        champ_value,
        mean_diff,
        upper,
    )


def check_floors(
    candidate: dict[str, float],
    champion: dict[str, float] | None,
    pcfg: PromotionConfig,
    labels_per_class: list[int],
) -> tuple[bool, list[str]]:
    """(passed, one line per floor) for `promotion.floors`: each metric may be worse than the
    champion's by at most its allowed amount. A metric measured on one side only is reported
    as not compared (it cannot block); no champion passes."""
    higher_better = floor_metrics(labels_per_class)
    if champion is None or not pcfg.floors:
        return True, []
    passed, notes = True, []
    for metric, allowed in sorted(pcfg.floors.items()):
        cand, champ = candidate.get(metric), champion.get(metric)
        if cand is None or champ is None or not (math.isfinite(cand) and math.isfinite(champ)):
            side = "candidate" if cand is None else "champion"
            notes.append(f"{metric} not compared (the {side} has no value measured alike)")
            continue
        worse = (champ - cand) if higher_better[metric] else (cand - champ)
        if worse > allowed + 1e-12:
            passed = False
            notes.append(
                f"{metric} {cand:.4g} vs champion {champ:.4g}: worse by {worse:.4g} > "
                f"promotion.floors.{metric}={allowed:g}"
            )
        else:
            notes.append(
                f"{metric} {cand:.4g} vs champion {champ:.4g} (allowed worse by {allowed:g})"
            )
    return passed, notes
