"""MLflow tracking: one run per retrain (params, per-epoch metrics, evaluation, pictures, model).

Only global rank 0 of a training job logs (the worker passes `EpochLogger` to rank 0 alone).
The logged model is a pyfunc whose artifact is our `model.pt` (constructor args + state_dict),
so loading it needs no unpickling of torch modules: `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from vae_pipeline.config import Config

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
WEIGHTS_FILE = "model.pt"


def redact(value: Any) -> Any:
    """Drop user:password from URLs, so credentials never reach params, tags or logs."""
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password or parts.username:
            host = parts.hostname or ""
            netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return value


def client_for(uri: str) -> MlflowClient:
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def ensure_experiment(client: MlflowClient, name: str, uri: str, workdir: Path) -> str:
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep artifacts beside the embedded store, not in whatever the cwd happens to be.
        location = (workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def start_run(cfg: Config, uri: str, workdir: Path, run_name: str, tags: dict[str, str]) -> str:
    """Create the retrain's run and log every param (flattened, credentials redacted)."""
    client = client_for(uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, uri, workdir)
    run = client.create_run(
        experiment_id, run_name=run_name, tags={k: str(redact(v)) for k, v in tags.items()}
    )
    params = [Param(k, str(redact(v))) for k, v in cfg.flat().items()]
    for start in range(0, len(params), 100):
        client.log_batch(run.info.run_id, params=params[start : start + 100])
    log.info(
        "MLflow run %s in experiment %r at %s",
        run.info.run_id,
        cfg.registry.experiment,
        redact(uri),
    )
    return run.info.run_id


class EpochLogger:
    """Per-epoch training metrics -> the retrain's run (called on global rank 0 only)."""

    def __init__(self, uri: str, run_id: str):
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id

    def __call__(self, record: dict) -> None:
        now = int(time.time() * 1000)
        step = int(record["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in record.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)


def log_evaluation(uri: str, run_id: str, metrics: dict, reports_dir: Path) -> None:
    """Test metrics (prefixed `test_`) and the report files."""
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)
    }
    client.log_batch(
        run_id,
        metrics=[Metric(f"test_{k}", v, now, 0) for k, v in numeric.items()],
        tags=[RunTag("test_data_version", str(metrics.get("data_version")))],
    )
    for name in ("metrics.json", "recon.png", "samples.png", "loss_curve.png"):
        path = reports_dir / name
        if path.is_file():
            client.log_artifact(run_id, str(path), artifact_path="reports")


def log_model(uri: str, run_id: str, weights: Path) -> str:
    """Log the model as pyfunc with our weights file as its artifact; returns its model URI."""
    client_for(uri)
    from vae_pipeline import pyfunc

    signature, example = _signature(weights)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name=MODEL_ARTIFACT,
            signature=signature,
            input_example=example,
            python_model=pyfunc.__file__,
            artifacts={"weights": str(weights)},
            # Explicit requirements: inferring them costs ~10 s per log.
            pip_requirements=pyfunc.pip_requirements(),
        )
    return info.model_uri


def _signature(weights: Path):
    """Tensor signature (N, C, H, W) -> (N, latent_dim) with the `output` param declared (MLflow
    drops predict params that the signature does not declare), and a one-image input example."""
    import torch
    from mlflow.models import infer_signature

    hp = torch.load(weights, map_location="cpu", weights_only=True)["hparams"]
    example = np.zeros((1, hp["in_channels"], hp["image_size"], hp["image_size"]), np.float32)
    output = np.zeros((1, hp["latent_dim"]), np.float32)
    return infer_signature(example, output, params={"output": "latent_mean"}), example


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def download_weights(uri: str, model_uri: str, dest: Path | None = None) -> Path:
    """Fetch a logged/registered model's weights file (e.g. models:/conv-vae@champion)."""
    client_for(uri)
    dest = Path(dest or tempfile.mkdtemp(prefix="vae-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest)))
    found = sorted(local.rglob(WEIGHTS_FILE))
    if not found:
        raise FileNotFoundError(f"{model_uri} holds no {WEIGHTS_FILE}: not a vae-pipeline model")
    return found[0]
