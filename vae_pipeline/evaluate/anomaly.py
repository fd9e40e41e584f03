"""Anomaly scores, and the correction that keeps simple inputs from passing as typical.

A likelihood model gives high likelihood to simple inputs it has never seen (Nalisnick et al.
2019): a black image, or uniform noise in a small patch of an otherwise black frame, can score
better than real images. The likelihood mixes two things: how complex the image is, and how
well the model, beyond a generic model, explains it. Serra et al. (2020, "Input complexity and
out-of-distribution detection with likelihood-based generative models") subtract the first,
measured as the image's length under a generic lossless compressor L(x), in the model's units:

    S(x) = -log p(x) - L(x)     (nats; higher = more anomalous)

In-distribution images are those the model explains far better than a compressor does (S well
below 0); an image the model explains no better than a compressor, however simple or complex,
scores near 0 or above. That is a likelihood ratio against a universal background model (Ren
et al. 2019 train a background model instead).

L(x) must measure the same object as the likelihood. For a Bernoulli decoder it is the code
length of an adaptive binary context model, the Krichevsky-Trofimov estimator of JBIG-style
coders, with no training (`context_code_length`): each pixel's context is its four causal
neighbours (W, NW, N, NE), and a context's pixels cost the KT code of their counts. For binary
images that is exactly the length an arithmetic coder with this model reaches (within 2 bits);
on intensities the counts are soft (sums of intensities), the same form as the Bernoulli
decoder's cross-entropy. For the 8-bit likelihoods (discretized logistic, Gaussian) L(x) is the
PNG length of the image's 8-bit pixels (`png_code_length`), Serra et al.'s compressor (for the
Gaussian density it is off by a constant, which the calibrated threshold absorbs). Either way
over the likelihood's pixels only (the model's content box).

That correction alone is not enough here (docs/evaluation.md): on intensities most of both
lengths is the floor no predictor avoids (`floor`: sum_i H(x_i) for Bernoulli targets), and
uniform noise in a 20x20 patch costs the context coder more than the model. `typicality`
therefore tests three statistics of each image against the validation images, each two-sided,
as the typicality test of Nalisnick et al. (2019, "Detecting out-of-distribution inputs to
deep generative models using typicality") does for the likelihood alone and DoSE (Morningstar
et al. 2021) for several statistics: the IW bound `nll` (too likely is as suspect as too
unlikely: a black image), the image's `structure` L(x) - floor (how unpredictable its pixels are
from their neighbours: noise), and the corrected score `corrected` = nll - L(x). Each tail's
probability comes from a Gaussian kernel estimate of the validation values; the score is
-log of the smallest (Tippett's combination), so one threshold covers all six tails.

Every score's threshold is a percentile of validation images' scores (`calibrate`); for
typicality, half of them (every other one) are the reference the tails are measured on and the
other half set the threshold, so the threshold is not set on the reference itself.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch

SCORES = ("iw_nll", "neg_elbo", "complexity", "typicality")
STATISTICS = ("nll", "structure", "corrected")  # what typicality tests, two-sided
UNITS = {"iw_nll": "nats", "neg_elbo": "nats", "complexity": "nats", "typicality": "-log p"}
# Causal neighbours (dy, dx) of the context model: W, NW, N, NE (JBIG's nearest ones).
TEMPLATE = ((0, -1), (-1, -1), (-1, 0), (-1, 1))
_LOG_PI = math.log(math.pi)


def content_view(x: torch.Tensor | np.ndarray, box: tuple | list | None) -> np.ndarray:
    """The likelihood's pixels of (N, C, H, W) images, as float64 (the whole image when `box`
    is None)."""
    a = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if box is not None:
        top, left, height, width = (int(v) for v in box)
        a = a[:, :, top : top + height, left : left + width]
    return a.astype(np.float64, copy=False)


def context_code_length(x: np.ndarray) -> np.ndarray:
    """Nats to code each image of `x` ((N, C, H, W) in [0, 1]) with an adaptive binary context
    model, channel by channel: the KT estimator per context of the `TEMPLATE` neighbours
    (> 0.5; outside the image they are 0), whose code length for n0 zeros and n1 ones is
    -log[Gamma(n0 + 1/2) Gamma(n1 + 1/2) / (pi Gamma(n0 + n1 + 1))]. Intensities count softly
    (n1 = the sum of the context's intensities)."""
    from scipy.special import gammaln

    x = np.asarray(x, dtype=np.float64)
    n, c, h, w = x.shape
    bits = np.pad(x > 0.5, ((0, 0), (0, 0), (1, 0), (1, 1)))  # a row above, a column each side
    context = np.zeros((n, c, h, w), dtype=np.int64)
    for k, (dy, dx) in enumerate(TEMPLATE):
        context |= bits[:, :, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w].astype(np.int64) << k
    contexts = 1 << len(TEMPLATE)
    flat = (np.arange(n * c).reshape(n, c, 1, 1) * contexts + context).ravel()
    size = n * c * contexts
    total = np.bincount(flat, minlength=size).astype(np.float64)
    ones = np.bincount(flat, weights=x.ravel(), minlength=size)
    zeros = total - ones
    used = total > 0
    length = np.where(
        used,
        gammaln(total + 1) + _LOG_PI - gammaln(ones + 0.5) - gammaln(zeros + 0.5),
        0.0,
    )
    return length.reshape(n, c * contexts).sum(axis=1)


def png_code_length(x: np.ndarray) -> np.ndarray:
    """Nats of each image of `x` ((N, C, H, W) in [0, 1], rounded to 8 bits) as a PNG
    (zlib level 9; grayscale, or RGB for 3 channels), header included."""
    from PIL import Image

    levels = np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
    out = np.empty(len(levels))
    for i, image in enumerate(levels):
        array = image[0] if image.shape[0] == 1 else np.moveaxis(image, 0, -1)
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG", compress_level=9)
        out[i] = 8 * len(buffer.getvalue()) * math.log(2)
    return out


def complexity(
    x: torch.Tensor | np.ndarray, likelihood: str, box: tuple | list | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(L(x), floor(x)) in nats, as the model with this `likelihood` sees `x` ((N, C, H, W) in
    [0, 1]: binarized already where the model is scored on binary pixels). The floor is the
    least -log p(x|z) any decoder reaches: sum_i H(x_i) for Bernoulli targets (0 on binary
    pixels), 0 for the 8-bit likelihoods."""
    view = content_view(x, box)
    if likelihood != "bernoulli":
        return png_code_length(view), np.zeros(len(view))
    inside = np.clip(view, 1e-300, 1.0), np.clip(1.0 - view, 1e-300, 1.0)
    entropy = -(view * np.log(inside[0]) + (1.0 - view) * np.log(inside[1]))
    return context_code_length(view), entropy.reshape(len(view), -1).sum(axis=1)


def statistics(terms: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The per-image values typicality tests (`STATISTICS`), from per_example_terms' terms."""
    nll = -np.asarray(terms["iw_log_px"], dtype=np.float64)
    length, floor = (np.asarray(terms[k], dtype=np.float64) for k in ("complexity", "floor"))
    return {"nll": nll, "structure": length - floor, "corrected": nll - length}


def bandwidth(reference: np.ndarray) -> float:
    """Silverman's rule of thumb for a Gaussian kernel on 1-D values."""
    ref = np.asarray(reference, dtype=np.float64)
    iqr = np.subtract(*np.percentile(ref, [75, 25]))
    spread = min(ref.std(ddof=1), iqr / 1.349) if iqr > 0 else ref.std(ddof=1)
    return float(0.9 * max(spread, 1e-6) * len(ref) ** -0.2)


def log_tail(values: np.ndarray, reference: np.ndarray, width: float) -> np.ndarray:
    """log of the smaller tail probability of each value under the kernel estimate (Gaussian
    kernels of `width` on `reference`): log min(P(V <= v), P(V >= v))."""
    from scipy.special import log_ndtr, logsumexp

    ref = np.asarray(reference, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(len(values))
    rows = max(1, 2**22 // max(len(ref), 1))  # bounded memory: ~32 MB a block, whatever N
    for start in range(0, len(values), rows):
        z = (values[start : start + rows, None] - ref[None, :]) / width
        lower = logsumexp(log_ndtr(z), axis=1)
        upper = logsumexp(log_ndtr(-z), axis=1)
        out[start : start + rows] = np.minimum(lower, upper) - math.log(len(ref))
    return out


def typicality(terms: dict[str, np.ndarray], reference: dict) -> np.ndarray:
    """-log of the smallest two-sided tail probability of the image's `STATISTICS` against the
    reference ({"values": {stat: list}, "width": {stat: float}}, from `calibrate`)."""
    stats = statistics(terms)
    tails = [log_tail(stats[k], reference["values"][k], reference["width"][k]) for k in STATISTICS]
    return -np.min(np.stack(tails), axis=0)


def anomaly_scores(
    terms: dict[str, np.ndarray], score: str, reference: dict | None = None
) -> np.ndarray:
    """Per-image anomaly score (higher = more anomalous), anomaly.score's quantity: iw_nll
    (-IW bound, nats), neg_elbo (nats), complexity (-IW bound - L(x), nats) or typicality
    (-log of a tail probability; `reference` from `calibrate`)."""
    if score not in SCORES:
        raise ValueError(f"anomaly score must be one of {SCORES}, not {score!r}")
    if score == "neg_elbo":
        return -np.asarray(terms["elbo"], dtype=np.float64)
    if score == "complexity":
        return statistics(terms)["corrected"]
    if score == "typicality":
        if reference is None:
            raise ValueError("the typicality score needs its reference (calibrate it first)")
        return typicality(terms, reference)
    return -np.asarray(terms["iw_log_px"], dtype=np.float64)


def calibrate(
    terms: dict[str, np.ndarray], score: str, percentile: float
) -> tuple[float, dict | None]:
    """(threshold, reference) from validation images' terms. For typicality the reference is
    every other image's `STATISTICS` (and their kernel widths) and the threshold is the
    `percentile` of the others' scores; for the other scores it is None and the threshold the
    `percentile` of all their scores."""
    if score != "typicality":
        return calibrate_threshold(anomaly_scores(terms, score), percentile), None
    if len(terms["iw_log_px"]) < 4:
        raise ValueError("the typicality score needs at least 4 validation images")
    stats = statistics(terms)
    values = {k: v[0::2] for k, v in stats.items()}
    reference = {
        "values": {k: [float(a) for a in v] for k, v in values.items()},
        "width": {k: bandwidth(v) for k, v in values.items()},
    }
    held = {k: np.asarray(v)[1::2] for k, v in terms.items() if k in TERMS}
    return calibrate_threshold(typicality(held, reference), percentile), reference


TERMS = ("iw_log_px", "complexity", "floor")  # what `statistics` reads


def calibrate_threshold(scores: np.ndarray, percentile: float) -> float:
    """The `percentile` of normal images' scores: images scoring above it are anomalies."""
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0 or not np.isfinite(scores).all():
        raise ValueError("calibration needs finite scores of at least one validation image")
    return float(np.percentile(scores, percentile))
