"""Evaluation on the held-out test split: ELBO components, the IW bound, pictures, metrics JSON.

One module per job: `estimator` (the numbers), `downstream` (the VAE's uses: anomaly
detection, the few-label probe, sample quality), `pictures`, `report` (summary.md);
`evaluate` runs them all.

Units: nats per example; see `estimator`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.placement import resident_decision
from vae_pipeline.evaluate.downstream import measure_uses, uses_key
from vae_pipeline.evaluate.estimator import (
    per_example_metrics,
    sharded_terms,
    summarize,
)
from vae_pipeline.evaluate.pictures import (
    plot_kl_per_dim,
    plot_loss_curves,
    save_grids,
    save_latent_pictures,
)
from vae_pipeline.evaluate.report import (
    summary_markdown,
    uses_markdown,
)
from vae_pipeline.model import ConvVAE

log = logging.getLogger(__name__)

__all__ = ["LATENT_MEANS", "evaluate"]

LATENT_MEANS = "test_latent_means.npy"


def _is_main() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate(
    cfg: Config,
    model: ConvVAE,
    workdir: Path = Path("."),
    history: list[dict] | None = None,
    device: torch.device = torch.device("cpu"),
) -> dict:
    """Evaluate on the prepared test split; write reports/metrics.json, per-example values,
    summary.md and the pictures (recon, samples, interpolation, traversal, kl_per_dim, loss).

    Inside a torchrun process group the examples are sharded over the ranks (same numbers as
    one process) and global rank 0 alone writes the files; every rank returns the metrics.
    """
    test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    images = test.tensor()
    t0 = time.perf_counter()
    # the same data path as training: the split copied to the device once when it fits
    resident, _ = resident_decision(cfg.train.resident_data, images.nbytes, device)
    terms = sharded_terms(model, images.to(device) if resident else images, cfg.evaluate, device)
    dims = model.pixel_count()
    metrics = summarize(terms, cfg.evaluate, dims, model.likelihood)
    metrics["data_version"] = test.manifest.get("data_version", "unversioned")
    metrics["eval_seconds"] = time.perf_counter() - t0
    if not _is_main():
        return metrics
    reports = workdir / cfg.evaluate.reports_dir
    reports.mkdir(parents=True, exist_ok=True)
    t1 = time.perf_counter()
    metrics.update(measure_uses(cfg, model, test, images, terms, workdir, device, reports))
    metrics["uses_key"] = uses_key(cfg, metrics["holdout_class"])
    metrics["uses_seconds"] = time.perf_counter() - t1
    (reports / "metrics.json").write_text(json.dumps(metrics, indent=2))
    for key, values in per_example_metrics(terms).items():
        np.save(reports / f"per_example_{key}.npy", values)
    # the encoder means of the test split: the drift monitor's latent reference, so it
    # compares new images with the data this model was tested on, whatever the workspace holds
    np.save(reports / LATENT_MEANS, np.asarray(terms["mu"], dtype=np.float32))
    save_grids(model, images, cfg.evaluate, reports, device)
    kl_dims = np.asarray(metrics["kl_per_dim"])
    save_latent_pictures(model, images, kl_dims, reports, device)
    plot_kl_per_dim(kl_dims, metrics["active_units"], reports / "kl_per_dim.png")
    (reports / "summary.md").write_text(summary_markdown(metrics))
    if history:
        plot_loss_curves(history, reports / "loss_curve.png")
    log.info(
        "test: elbo %.2f  recon %.2f  kl %.2f  iw_nll(K=%d) %.2f  %.4f bits/dim (D=%d)  "
        "IW ESS mean %.1f min %.2f  %d active units  (%d images, %.1f s)",
        metrics["elbo"],
        metrics["recon"],
        metrics["kl"],
        metrics["iw_k"],
        metrics["iw_nll"],
        metrics["bits_per_dim"],
        metrics["pixels"],
        metrics.get("iw_ess_mean", math.nan),
        metrics.get("iw_ess_min", math.nan),
        metrics["active_units"],
        metrics["n_examples"],
        metrics["eval_seconds"],
    )
    log.info("uses (%.1f s):\n%s", metrics["uses_seconds"], "\n".join(uses_markdown(metrics)[3:]))
    return metrics
