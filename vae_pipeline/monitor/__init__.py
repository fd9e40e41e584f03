"""The drift monitor: score the new images of a snapshot and compare them with the champion's
own test set, by two checks.

New images are those whose content is not in the prepared data (data/prepared/index.csv):
the monitored source may keep old images beside new arrivals. They are decoded and fitted by
the one rule every source follows (`vae_pipeline.data.images.fit_array`), so a 28x28 image in
a folder is the same tensor as in Fashion-MNIST's IDX files.

- **likelihood** (two-sided, a typicality test in the sense of Nalisnick et al. 2019): the
  mean negative ELBO of the new images (nats per image, one posterior sample from each image's
  seeded stream, as in evaluation) against the champion's per-example values on its test set,
  stored with its MLflow run. It fires when the whole confidence interval of the shift lies
  beyond +-monitor.threshold_nats. Both ways: images from a simpler domain (digits for a
  clothing model) score *better* than the test set, and are drift too.
- **latent**: the encoder means of the new images against those of prepared test images
  (a sample of data.prepared_dir's test split), by the unbiased MMD^2 with a Gaussian kernel
  (median-distance bandwidth) and a permutation test (Gretton et al. 2012). It sees a change
  in what the images are, whether or not their likelihood moves.

Decision: drift when any check fires; each of the k checks runs at level
(1 - monitor.confidence) / k, so the false-alarm rate of the whole decision on in-distribution
images is at most 1 - monitor.confidence (Bonferroni).

The numbers are gathered in `check` (snapshot, new images, scores, the check); the statistics
on them are in `drift` (the likelihood and latent checks, the decision).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DriftDecision": "vae_pipeline.monitor.drift",
    "MonitorError": "vae_pipeline.monitor.drift",
    "check_drift": "vae_pipeline.monitor.check",
    "drift_decision": "vae_pipeline.monitor.drift",
}

__all__ = ["DriftDecision", "MonitorError", "check_drift", "drift_decision"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
