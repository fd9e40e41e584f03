"""Model versions with per-example evidence, made the way `pipeline.register` stores it (a run
holding reports/per_example_iw_nll.npy, a version with evaluation tags), without training."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline.config import build_config

from .conftest import tiny_params

NAME = "conv-vae"
KEY = "data=abc|K=4|binarize=none|seed=0|n=400"


def registry_cfg(uri: str, name: str = NAME, **promotion):
    return build_config(
        tiny_params(
            registry={"tracking_uri": uri, "model_name": name},
            promotion={"bootstrap_samples": 500, "lock_timeout_s": 60, **promotion},
        )
    )


def artifact_location(client: MlflowClient) -> str | None:
    """Artifacts beside a SQLite store (in the test's temporary folder), not in ./mlruns of
    whatever folder the suite runs in; a server keeps its own default."""
    uri = client._tracking_client.tracking_uri
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).parent / "gate-artifacts").as_uri()


def add_version(
    client: MlflowClient,
    values: np.ndarray,
    active_units: int = 8,
    key: str = KEY,
    name: str = NAME,
    likelihood: str | None = None,
    uses: dict[str, float] | None = None,
    uses_key: str = "holdout=Bag|probe",
) -> str:
    experiment = client.get_experiment_by_name("gate-tests")
    experiment_id = (
        experiment.experiment_id
        if experiment
        else client.create_experiment("gate-tests", artifact_location=artifact_location(client))
    )
    run_id = client.create_run(experiment_id).info.run_id
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "per_example_iw_nll.npy"
        np.save(path, values)
        client.log_artifact(run_id, str(path), artifact_path="reports")
    client.set_terminated(run_id)
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    mv = client.create_model_version(
        name,
        source=client.get_run(run_id).info.artifact_uri + "/model",
        run_id=run_id,
        tags={
            "eval_key": key,
            "iw_nll": repr(float(values.mean())),
            "active_units": str(active_units),
            "test_data_version": "abc",
            **({"likelihood": likelihood} if likelihood else {}),
            # The uses' metrics, as pipeline.register tags them (promotion.floors read them).
            **({k: repr(float(v)) for k, v in (uses or {}).items()}),
            **({"uses_key": uses_key} if uses else {}),
            **({"holdout_class": uses_key.split("|")[0].removeprefix("holdout=")} if uses else {}),
        },
    )
    return str(mv.version)


def evidence(seed: int, n: int = 400, shift: float = 0.0, base_seed: int = 0) -> np.ndarray:
    """Per-example NLLs: a shared per-image difficulty plus small model-specific noise, so paired
    differences are tight (as for two models on the same test images)."""
    difficulty = np.random.default_rng(base_seed).normal(300.0, 25.0, size=n)
    return difficulty + shift + np.random.default_rng(seed + 1000).normal(0.0, 0.5, size=n)
