"""Model registry: register a candidate with lineage tags; move `champion` only for a better model.

The gate (skeleton rule, deepened by the promotion issue): promote when there is no champion,
or when the candidate's `promotion.metric` (lower is better) beats the champion's by more than
`promotion.min_improvement_nats` on the *same* test data version. When the champion was
evaluated on another test data version, it is re-evaluated on the candidate's test split first.
A candidate that is not promoted gets the `challenger` alias and a tag with the reason.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.evaluate import per_example_terms, summarize
from vae_pipeline.tracking import client_for, download_weights
from vae_pipeline.train.checkpoint import load_model

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Decision:
    promoted: bool
    reason: str
    candidate_version: str
    candidate_value: float
    champion_version: str | None = None
    champion_value: float | None = None


def register(uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Create a model version (or return the one this run already registered: idempotent)."""
    client = client_for(uri)
    try:
        existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        existing = []
    if existing:
        version = existing[0].version
        log.info("run %s already registered as %s v%s", run_id, name, version)
    else:
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v) for k, v in tags.items()}
        ).version
        log.info("registered %s version %s", name, version)
    return str(version)


def champion(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None


def _metric_on(cfg: Config, uri: str, version, workdir: Path, test_version: str) -> float:
    """The champion's metric on the candidate's test data: its tag if that version matches,
    else a fresh evaluation of its weights on the current test split."""
    tags = version.tags or {}
    if tags.get("test_data_version") == test_version and cfg.promotion.metric in tags:
        return float(tags[cfg.promotion.metric])
    log.info(
        "champion v%s was evaluated on test data %s; re-evaluating on %s",
        version.version,
        tags.get("test_data_version"),
        test_version,
    )
    weights = download_weights(uri, f"models:/{version.name}/{version.version}")
    model, _ = load_model(weights)
    test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    images = test.tensor()
    metrics = summarize(
        per_example_terms(model, images, cfg.evaluate, _cpu()), cfg.evaluate, int(images[0].numel())
    )
    return float(
        metrics[cfg.promotion.metric] if cfg.promotion.metric != "elbo_nll" else -metrics["elbo"]
    )


def _cpu():
    import torch

    return torch.device("cpu")


def decide(candidate: float, incumbent: float | None, min_improvement: float) -> tuple[bool, str]:
    """Lower is better. Pure function: the rule in one place."""
    if not math.isfinite(candidate):
        return False, f"candidate metric is not finite ({candidate})"
    if incumbent is None:
        return True, "no champion yet"
    margin = incumbent - candidate
    if margin > min_improvement:
        return True, f"better by {margin:.3f} nats (> {min_improvement})"
    return (
        False,
        f"not better: {candidate:.3f} vs champion {incumbent:.3f} (needs > {min_improvement} nats lower)",
    )


def promote_if_better(
    cfg: Config, uri: str, version: str, metrics: dict, workdir: Path = Path(".")
) -> Decision:
    """Apply the gate to a registered candidate and move the aliases accordingly."""
    name = cfg.registry.model_name
    client = client_for(uri)
    key = cfg.promotion.metric
    value = float(metrics[key] if key != "elbo_nll" else -metrics["elbo"])
    current = champion(client, name)
    incumbent = None
    if current is not None and str(current.version) != str(version):
        incumbent = _metric_on(cfg, uri, current, workdir, str(metrics["data_version"]))
    elif current is not None:
        return Decision(True, "already champion", version, value, str(current.version), value)
    promoted, reason = decide(value, incumbent, cfg.promotion.min_improvement_nats)
    decision = Decision(
        promoted,
        reason,
        version,
        value,
        None if current is None else str(current.version),
        incumbent,
    )
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, version)
    else:
        client.set_registered_model_alias(name, CHALLENGER, version)
    client.set_model_version_tag(
        name, version, "gate_decision", "promoted" if promoted else "rejected"
    )
    client.set_model_version_tag(name, version, "gate_reason", reason)
    log.info(
        "gate: %s v%s %s (%s)",
        name,
        version,
        "-> champion" if promoted else "stays challenger",
        reason,
    )
    return decision


def decision_dict(decision: Decision) -> dict:
    return asdict(decision)
