"""The gate's evidence: a version's per-example metric on the test split this config evaluates
(stored with its run when measured alike, else re-evaluated here), and its uses' metrics."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, resolve_label
from vae_pipeline.evaluate.downstream import measure_uses
from vae_pipeline.evaluate.estimator import per_example_metrics, per_example_terms, summarize
from vae_pipeline.registry.versions import PER_EXAMPLE, stored_uses
from vae_pipeline.tracking import download_weights
from vae_pipeline.train.checkpoint import load_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Evidence:
    values: np.ndarray  # the per-example promotion metric, in test-split order
    active_units: int
    source: str  # "stored" or "re-evaluated"
    uses: dict[str, float] | None = None  # the uses' metrics, when asked for and comparable


def per_example(
    cfg: Config, uri: str, mv, workdir: Path, key: str, ukey: str | None = None
) -> Evidence:
    """The evidence for model version `mv` on the evaluation `key`: its run's stored values
    when it was evaluated that way, else a fresh evaluation of its weights on the prepared test
    split in `workdir`. With `ukey` (promotion.floors are set) its uses' metrics too, measured
    as `ukey` says: stored, or re-measured (not for a model trained without another class)."""
    tags = mv.tags or {}
    metric = cfg.promotion.metric
    uses = stored_uses(tags, ukey)
    # A version tagged as trained without another class cannot be compared on the uses: no
    # re-evaluation for them.
    wanted = None if ukey is None else ukey.split("|", 1)[0].removeprefix("holdout=")
    other_class = tags.get("holdout_class") != wanted
    comparable = ukey is None or uses is not None or other_class
    if tags.get("eval_key") == key and mv.run_id and comparable:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id,
                artifact_path=PER_EXAMPLE.format(metric=metric),
                dst_path=tempfile.mkdtemp(prefix="vae-gate-"),
                tracking_uri=uri,
            )
            stored = np.load(local)
            return Evidence(stored, int(float(tags.get("active_units", 0))), "stored", uses)
        except (MlflowException, OSError) as exc:
            log.warning("v%s: stored per-example values unavailable (%s)", mv.version, exc)
    log.info(
        "%s v%s was evaluated as %s (uses %s); re-evaluating it as %s (uses %s)",
        mv.name,
        mv.version,
        tags.get("eval_key"),
        tags.get("uses_key"),
        key,
        ukey,
    )
    model, meta = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
    test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    images = test.tensor()
    device = torch.device("cpu")
    terms = per_example_terms(model, images, cfg.evaluate, device)
    summary = summarize(terms, cfg.evaluate, model.pixel_count(), model.likelihood)
    uses = None
    if ukey is not None:
        names = list(test.manifest.get("label_names") or [])
        held = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
        if meta.get("holdout_class") == (None if held is None else names[held]):
            uses = measure_uses(cfg, model, test, images, terms, workdir, device)
        else:
            log.info(
                "v%s was trained without class %s, not %s: its uses are not compared",
                mv.version,
                meta.get("holdout_class"),
                cfg.anomaly.holdout_class,
            )
    values = per_example_metrics(terms)[metric]
    return Evidence(values, int(summary["active_units"]), "re-evaluated", uses)
