"""Registered versions: registration with its tags, the evaluation and uses keys that say which
evaluations can be paired, and the aliases (champion, challenger, previous-champion)."""

from __future__ import annotations

import contextlib
import getpass
import logging
import socket
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, resolve_label
from vae_pipeline.data.errors import DataError
from vae_pipeline.errors import UserError
from vae_pipeline.evaluate.downstream import uses_key
from vae_pipeline.evaluate.estimator import EVAL_PROTOCOL, METRIC_KEYS
from vae_pipeline.tracking import client_for

log = logging.getLogger(__name__)


CHAMPION = "champion"


CHALLENGER = "challenger"


PREVIOUS = "previous-champion"


PER_EXAMPLE = "reports/per_example_{metric}.npy"


def eval_key(metrics: dict) -> str:
    """What must match for two evaluations to be paired example by example."""
    m = metrics
    return (
        f"data={m.get('data_version')}|K={m.get('iw_k')}|binarize={m.get('binarize')}"
        f"|seed={m.get('eval_seed')}|n={m.get('n_examples')}|protocol={m.get('eval_protocol')}"
    )


def current_eval_key(cfg: Config, workdir: Path) -> str | None:
    """The eval_key an evaluation with `cfg` would get on the prepared test split (None when
    there is no prepared test split in `workdir`)."""
    try:
        test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    except (OSError, ValueError, DataError):
        return None
    return eval_key(
        {
            "data_version": test.manifest.get("data_version", "unversioned"),
            "iw_k": cfg.evaluate.iw_samples,
            "binarize": cfg.evaluate.binarize,
            "eval_seed": cfg.evaluate.seed,
            "n_examples": len(test),
            "eval_protocol": EVAL_PROTOCOL,
        }
    )


def version_tags(metrics: dict) -> dict[str, str]:
    """Evaluation tags of a model version: metrics, the evaluation's settings, its key."""
    tags = {key: repr(float(metrics[key])) for key in METRIC_KEYS if key in metrics}
    if "active_units" in metrics:
        tags["active_units"] = str(int(metrics["active_units"]))
    tags["elbo_nll"] = repr(-float(metrics["elbo"]))
    tags["test_data_version"] = str(metrics.get("data_version"))
    for key in ("iw_k", "binarize", "likelihood", "eval_seed", "n_examples", "eval_protocol"):
        tags[key] = str(metrics.get(key))
    tags["eval_key"] = eval_key(metrics)
    for key, value in metrics.items():  # the uses' metrics, for promotion.floors
        if key.startswith(USE_METRIC_PREFIXES) and _is_number(value):
            tags[key] = repr(float(value))
    for key in ("uses_key", "holdout_class", "anomaly_score"):
        if key in metrics:
            tags[key] = str(metrics[key])
    return tags


USE_METRIC_PREFIXES = ("anomaly_", "probe_", "sample_fd")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def current_uses_key(cfg: Config, workdir: Path) -> str | None:
    """The uses_key an evaluation with `cfg` would get here (None without prepared data)."""
    try:
        test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
        names = list(test.manifest.get("label_names") or [])
        holdout = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
    except (OSError, ValueError, DataError):
        return None
    return uses_key(cfg, None if holdout is None else names[holdout])


def stored_uses(tags: dict[str, str], key: str | None) -> dict[str, float] | None:
    """A version's uses metrics from its tags, when measured as `key` says (else None)."""
    if key is None or tags.get("uses_key") != key:
        return None
    out = {}
    for name, value in tags.items():
        if name.startswith(USE_METRIC_PREFIXES):
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def version_of_run(uri: str, name: str, run_id: str) -> str | None:
    """The version of `name` that run `run_id` registered, if any."""
    try:
        found = client_for(uri).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return str(found[0].version) if found else None


def register(uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Create a model version (or return the one this run already registered: idempotent)."""
    version = version_of_run(uri, name, run_id)
    if version is not None:
        log.info("run %s already registered as %s v%s", run_id, name, version)
    else:
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v) for k, v in tags.items()}
        ).version
        log.info("registered %s version %s", name, version)
    return str(version)


def model_version(client: MlflowClient, name: str, version: str | int):
    """Version `version` of `name`; one that does not exist is a UserError naming it."""
    try:
        return client.get_model_version(name, str(version))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise UserError(
            f"{name} has no version {version}: `vae-pipeline history` lists its alias moves, "
            "the MLflow UI its versions"
        ) from None


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion(client: MlflowClient, name: str):
    return alias_version(client, name, CHAMPION)


def default_actor() -> str:
    with contextlib.suppress(Exception):
        return f"{getpass.getuser()}@{socket.gethostname()}"
    return "unknown"


def get_registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None
