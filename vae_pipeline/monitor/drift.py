"""The drift statistics, on numbers alone: a two-sided likelihood check (Welch t interval of
the shift in mean negative ELBO against +-threshold) and a latent check (unbiased MMD^2 of encoder
means with a permutation test), combined at a Bonferroni level. `monitor.check` gathers
the numbers; the rule and its false-alarm rate are documented there and in docs/orchestration.md.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from vae_pipeline.config.sections import MonitorConfig
from vae_pipeline.errors import UserError


class MonitorError(UserError):
    """The monitor cannot score: no champion, no reference, or no usable source."""


@dataclass
class Check:
    """One drift check: its statistic, what it is compared with, and what that means."""

    name: str
    statistic: float
    bound: float
    fired: bool
    line: str


@dataclass
class DriftDecision:
    retrain: bool
    drift: bool
    reason: str
    shift: float  # mean new score minus mean reference score, nats per image
    stderr: float
    lower_bound: float
    upper_bound: float
    threshold: float
    confidence: float
    new_mean: float
    new_n: int
    reference_mean: float
    reference_n: int
    mmd2: float = math.nan
    mmd_p: float = math.nan
    checks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def welch_t(alpha: float, a: float, b: float, n: int, m: int) -> float:
    """The two-sided (1 - alpha) quantile of Student's t with Welch-Satterthwaite degrees of
    freedom, for squared standard errors a (n values) and b (m values): a few new images get
    the wider interval they need (a normal quantile under-covers at n = 10)."""
    from scipy.stats import t

    if a + b == 0:
        return 0.0
    df = (a + b) ** 2 / (a**2 / (n - 1) + b**2 / (m - 1))
    return float(t.ppf(1 - alpha / 2, df))


def likelihood_check(
    new: np.ndarray, reference: np.ndarray, threshold: float, alpha: float
) -> tuple[Check, dict]:
    """Two-sided test of the mean per-image score: the (1 - alpha) Welch interval of the shift
    (a difference of two independent means) must lie wholly beyond +-threshold to fire."""
    new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
    shift = float(new.mean() - reference.mean())
    a, b = new.var(ddof=1) / len(new), reference.var(ddof=1) / len(reference)
    stderr = math.sqrt(a + b)
    half = welch_t(alpha, a, b, len(new), len(reference)) * stderr
    lower, upper = shift - half, shift + half
    fired = lower > threshold or upper < -threshold
    if lower > threshold:
        meaning = "the new images are less likely under the champion than its test set"
    elif upper < -threshold:
        meaning = (
            "the new images are MORE likely than its test set: simpler images, typically "
            "another domain (a likelihood model rates those highly)"
        )
    else:
        meaning = "no shift beyond the threshold"
    line = (
        f"likelihood: mean negative ELBO {new.mean():.2f} vs {reference.mean():.2f} nats, "
        f"shift {shift:+.2f}, {1 - alpha:.1%} interval [{lower:+.2f}, {upper:+.2f}] vs "
        f"+-{threshold:g}: {meaning}"
    )
    numbers = {"shift": shift, "stderr": stderr, "lower_bound": lower, "upper_bound": upper}
    return Check("likelihood", shift, threshold, fired, line), numbers


def _mmd2_rows(kernel: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for each column of the boolean assignment `in_x` (N, P) over a kernel
    matrix with a zero diagonal."""
    a = in_x.astype(np.float64)
    b = 1.0 - a
    n, m = a.sum(0), b.sum(0)
    ka, kb = kernel @ a, kernel @ b
    xx = (a * ka).sum(0) / (n * (n - 1))
    yy = (b * kb).sum(0) / (m * (m - 1))
    xy = (a * kb).sum(0) / (n * m)
    return xx + yy - 2.0 * xy


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int, seed: int
) -> tuple[float, float, float]:
    """(unbiased MMD^2, permutation p-value, kernel bandwidth^2) of samples x (n, d) and y
    (m, d), with k(a, b) = exp(-|a - b|^2 / h) and h the median squared distance of the pooled
    sample (a function of the pool alone, so the permutation test stays exact)."""
    z = np.vstack([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    n = len(x)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    off = d2[np.triu_indices(len(z), 1)]
    h = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
    kernel = np.exp(-d2 / h)
    np.fill_diagonal(kernel, 0.0)
    labels = np.zeros(len(z), bool)
    labels[:n] = True
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, permutations, 100):  # (N, 100) assignments at a time
        cols = min(100, permutations - start)
        stats.append(
            _mmd2_rows(kernel, np.stack([rng.permutation(labels) for _ in range(cols)], 1))
        )
    observed = float(_mmd2_rows(kernel, labels[:, None])[0])
    null = np.concatenate(stats)
    p = float((1 + np.sum(null >= observed)) / (1 + len(null)))
    return observed, p, h


def latent_check(
    new_mu: np.ndarray, ref_mu: np.ndarray, alpha: float, permutations: int, seed: int
) -> tuple[Check, dict]:
    """MMD permutation test on encoder means: fires when its p-value is at most alpha."""
    mmd2, p, _ = mmd_test(new_mu, ref_mu, permutations, seed)
    fired = p <= alpha
    meaning = (
        "the new images' latent codes are distributed differently from the test images'"
        if fired
        else "no difference found"
    )
    line = (
        f"latent: MMD^2 {mmd2:.4f} between the encoder means of {len(new_mu)} new and "
        f"{len(ref_mu)} test images, permutation p = {p:.3f} vs {alpha:.3f}: {meaning}"
    )
    return Check("latent", p, alpha, fired, line), {"mmd2": mmd2, "mmd_p": p}


def drift_decision(
    new: np.ndarray,
    reference: np.ndarray,
    mcfg: MonitorConfig,
    always: bool = False,
    new_mu: np.ndarray | None = None,
    ref_mu: np.ndarray | None = None,
    latent_note: str | None = None,
) -> DriftDecision:
    """Combine the checks on per-image scores (negative ELBO) and, when given, encoder means:
    drift when any fires, each at level (1 - confidence) / k."""
    new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
    if len(new) < 2 or len(reference) < 2:
        raise MonitorError(
            f"need at least 2 scores on each side (new {len(new)}, reference {len(reference)})"
        )
    latent = new_mu is not None and ref_mu is not None and len(new_mu) >= 2 and len(ref_mu) >= 2
    alpha = (1.0 - mcfg.confidence) / (2 if latent else 1)
    check, numbers = likelihood_check(new, reference, mcfg.threshold_nats, alpha)
    checks = [check]
    if latent:
        check, mmd = latent_check(new_mu, ref_mu, alpha, mcfg.permutations, mcfg.seed)
        checks.append(check)
        numbers.update(mmd)
    drift = any(c.fired for c in checks)
    fired = [c.name for c in checks if c.fired]
    reason = (
        f"drift ({', '.join(fired)} check{'s' if len(fired) > 1 else ''} fired)"
        if drift
        else f"no drift ({' and '.join(c.name for c in checks)} checks quiet)"
    )
    if not latent:
        reason += f"; latent check not run: {latent_note or 'no encoder means given'}"
    if always and not drift:
        reason += "; retraining anyway (always_retrain)"
    return DriftDecision(
        retrain=drift or always,
        drift=drift,
        reason=reason,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=float(new.mean()),
        new_n=len(new),
        reference_mean=float(reference.mean()),
        reference_n=len(reference),
        checks=[asdict(c) for c in checks],
        **numbers,
    )
