"""MLflow tracking: one run per retrain (params, per-epoch metrics, evaluation, pictures, model).

Only global rank 0 of a training job logs (the worker passes `EpochLogger` to rank 0 alone).
The logged model is a pyfunc whose artifact is our `model.pt` (constructor args + state_dict),
so loading it needs no unpickling of torch modules: `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline.config import Config
from vae_pipeline.errors import TransientError, UserError

log = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
TORCH_ARTIFACT = "pytorch"


def redact(value: Any) -> Any:
    """Drop user:password from URLs, so credentials never reach params, tags or logs."""
    if isinstance(value, str) and "@" in value and "://" in value:
        parts = urlsplit(value)
        if parts.password or parts.username:
            host = parts.hostname or ""
            netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
            return urlunsplit(parts._replace(netloc=netloc))
    return value


class TrackingUnavailable(TransientError):
    """The MLflow tracking/registry store cannot be reached; raised before any work starts."""


class TrackingAuthError(UserError):
    """The MLflow server refused this client's credentials (basic auth); retrying won't help."""


def _check_access(uri: str, shown: str) -> None:
    try:
        MlflowClient(uri).search_experiments(max_results=1)
    except MlflowException as exc:
        status = exc.get_http_status_code()
        if status in (401, 403):
            raise TrackingAuthError(
                f"MLflow tracking server {shown} refused access (HTTP {status}): it requires a "
                "user; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to one of its "
                "users (with infra/compose.yaml: MLFLOW_ADMIN_USERNAME / _PASSWORD in infra/.env)"
            ) from None
        raise


def preflight(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before data or training work, when the tracking store is unusable.

    http(s): the server's /health endpoint must answer (one try, `timeout_s`), and a read of
    the experiments must be allowed: a server with authentication (`--app-name basic-auth`)
    answers /health to anyone but the API only to a user, whom the MLflow client takes from
    MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. sqlite: the database's folder must
    exist and be writable. Other schemes are left to MLflow.
    """
    import requests

    scheme = urlsplit(uri).scheme
    shown = redact(uri)
    if scheme in ("http", "https"):
        url = uri.rstrip("/") + "/health"
        try:
            response = requests.get(url, timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} is not reachable ({type(exc).__name__}): start it "
                "(`mlflow server ...` or `make stack-up`) or point registry.tracking_uri / "
                "MLFLOW_TRACKING_URI at a running one"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailable(
                f"MLflow tracking server {shown} answered /health with HTTP "
                f"{response.status_code}: check the server and its logs"
            )
        _check_access(uri, shown)
    elif scheme == "sqlite":
        path = Path(uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else "")
        folder = path.parent if path.name else Path(".")
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise TrackingUnavailable(
                f"MLflow store {shown}: folder {folder} does not exist or is not writable"
            )


def client_for(uri: str) -> MlflowClient:
    """A client for `uri`, also made MLflow's process-wide default (fluent APIs use it).

    `mlflow.set_tracking_uri` also exports the URI to the environment; the user's own
    MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI are put back, so that `config.tracking_uri` keeps
    resolving from what the user configured (not from whichever store this process used last).
    """
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# The MLflow UI opens an experiment in its model-training view, not the GenAI one, when the
# experiment says which kind it is (the tag the UI's own kind selector writes).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
# What the run page shows as "Source": the Prefect flow's entrypoint, run as a job.
SOURCE_NAME = "flows/retrain.py:retrain"


def ensure_experiment(client: MlflowClient, name: str, uri: str, workdir: Path) -> str:
    """The experiment's id, created if missing; marked as model training unless it already
    says its kind (a kind a user chose in the UI is kept)."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        if EXPERIMENT_KIND[0] not in found.tags:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    location = None
    if uri.startswith("sqlite:") or uri.startswith("file:"):
        # Keep artifacts beside the embedded store, not in whatever the cwd happens to be.
        location = (workdir / "mlartifacts").resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def source_tags(git_commit: str) -> dict[str, str]:
    """MLflow's own run tags for "Source", "Created by" and the commit on the run page."""
    import getpass

    from mlflow.entities import SourceType
    from mlflow.utils.mlflow_tags import (
        MLFLOW_GIT_COMMIT,
        MLFLOW_SOURCE_NAME,
        MLFLOW_SOURCE_TYPE,
        MLFLOW_USER,
    )

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container's numeric user)
        user = str(os.getuid())
    tags = {
        MLFLOW_SOURCE_NAME: SOURCE_NAME,
        MLFLOW_SOURCE_TYPE: SourceType.to_string(SourceType.JOB),
        MLFLOW_USER: user,
    }
    if git_commit and git_commit != "unknown":
        tags[MLFLOW_GIT_COMMIT] = git_commit.removesuffix("-dirty")
    return tags


def start_run(cfg: Config, uri: str, workdir: Path, run_name: str, tags: dict[str, str]) -> str:
    """Create the retrain's run (with MLflow's source tags) and log every param (flattened,
    credentials redacted)."""
    client = client_for(uri)
    experiment_id = ensure_experiment(client, cfg.registry.experiment, uri, workdir)
    tags = {**source_tags(tags.get("git_commit", "unknown")), **tags}
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

    def __call__(self, record: dict, model=None) -> None:
        now = int(time.time() * 1000)
        step = int(record["epoch"])
        metrics = [Metric(k, float(v), now, step) for k, v in record.items() if k != "epoch"]
        self.client.log_batch(self.run_id, metrics=metrics)


class CheckpointModels:
    """Each epoch's weights as an MLflow 3 logged model of the run (`checkpoint`, step = the
    epoch), with that epoch's metrics (logged at the same step by `EpochLogger`, called first)
    linked to it: the run's Models tab lists one per epoch with its val_loss, and a user picks
    the best and registers it (`models:/<model_id>`, a pyfunc like the final model). Rank 0
    only (`registry.log_checkpoints`); resuming is unchanged (checkpoint.pt is the resume
    state), and a resumed run logs the epochs it trains."""

    NAME = "checkpoint"

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id
        self.signature = None

    def __call__(self, record: dict, model) -> None:
        from vae_pipeline.evaluate.model_file import WEIGHTS_FILE
        from vae_pipeline.train.checkpoint import atomic_save

        client_for(self.uri)
        epoch = int(record["epoch"])
        with tempfile.TemporaryDirectory(prefix="vae-checkpoint-") as tmp:
            weights = Path(tmp, WEIGHTS_FILE)
            state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
            atomic_save({"hparams": model.hparams(), "state_dict": state, "epoch": epoch}, weights)
            if self.signature is None:
                self.signature, _ = _signature(weights)
            with warnings.catch_warnings():  # no input example: it would load and run it
                warnings.filterwarnings("ignore", ".*An input example was not provided")
                self._log(weights, epoch)

    def _log(self, weights: Path, epoch: int) -> None:
        from mlflow.models import Model

        from vae_pipeline import pyfunc

        Model.log(
            artifact_path=None,
            name=self.NAME,
            flavor=mlflow.pyfunc,
            run_id=self.run_id,
            step=epoch,
            python_model=pyfunc.__file__,
            artifacts={"weights": str(weights)},
            signature=self.signature,
            metadata={"outputs": pyfunc.OUTPUTS, "epoch": epoch},
            pip_requirements=pyfunc.pip_requirements(),
        )


def log_evaluation(
    uri: str,
    run_id: str,
    metrics: dict,
    reports_dir: Path,
    model_id: str | None = None,
    dataset: tuple[str, str] | None = None,
) -> None:
    """Test metrics (prefixed `test_`), the report files, and summary.md as the run's notes.

    With `model_id` (the logged model's) and `dataset` (name, digest of the test split's
    dataset input), each metric is linked to both, as MLflow 3 links a model's metrics: the
    model's page lists them, and the run's metrics name the model and the data."""
    client = MlflowClient(tracking_uri=uri)
    now = int(time.time() * 1000)
    numeric = {
        k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and np.isfinite(v)
    }
    tags = [RunTag("test_data_version", str(metrics.get("data_version")))]
    summary = reports_dir / "summary.md"
    if summary.is_file():  # shown as the run's description in the MLflow UI
        tags.append(RunTag("mlflow.note.content", summary.read_text()))
    name, digest = dataset or (None, None)
    client.log_batch(
        run_id,
        metrics=[
            Metric(
                f"test_{k}",
                v,
                now,
                0,
                model_id=model_id,
                dataset_name=name,
                dataset_digest=digest,
            )
            for k, v in numeric.items()
        ],
        tags=tags,
    )
    for pattern in (
        "metrics.json",
        "summary.md",
        "*.png",
        "per_example_*.npy",
        "test_latent_*.npy",
    ):
        for path in sorted(reports_dir.glob(pattern)):
            client.log_artifact(run_id, str(path), artifact_path="reports")


# The evaluation's keys that make the anomaly threshold stored with a model.
ANOMALY_KEYS = {
    "anomaly_score": "score",
    "anomaly_threshold": "threshold",
    "anomaly_reference": "reference",
    "anomaly_threshold_percentile": "percentile",
    "iw_k": "k",
    "holdout_class": "holdout_class",
    "data_version": "test_data_version",
}


def anomaly_record(metrics: dict) -> dict | None:
    """The threshold consumers apply (score > threshold = anomaly), from an evaluation."""
    if "anomaly_threshold" not in metrics:
        return None
    return {new: metrics.get(old) for old, new in ANOMALY_KEYS.items()}


def log_model(
    uri: str, run_id: str, weights: Path, anomaly: dict | None = None
) -> tuple[str, str, str]:
    """Log the model twice into the run: as pyfunc (what is registered and served; its artifacts
    are our weights file and, with `anomaly`, anomaly.json: the calibrated threshold) and in
    MLflow's PyTorch flavor (torch.export "pt2", no pickle) for those who want the module.
    Returns (pyfunc model URI, PyTorch model URI, the pyfunc's logged-model id)."""
    import json

    client_for(uri)
    from vae_pipeline import pyfunc
    from vae_pipeline.evaluate.model_file import ANOMALY_FILE

    signature, example = _signature(weights)
    artifacts = {"weights": str(weights)}
    with tempfile.TemporaryDirectory(prefix="vae-anomaly-") as tmp:
        if anomaly is not None:
            path = Path(tmp, ANOMALY_FILE)
            path.write_text(json.dumps(anomaly, indent=2))
            artifacts["anomaly"] = str(path)
        with mlflow.start_run(run_id=run_id):
            info = _log_pyfunc(pyfunc, signature, example, artifacts)
            torch_info = _log_pytorch_flavor(weights, example)
    return info.model_uri, torch_info.model_uri, info.model_id


def _log_pyfunc(pyfunc, signature, example, artifacts: dict[str, str]):
    return mlflow.pyfunc.log_model(
        name=MODEL_ARTIFACT,
        signature=signature,
        input_example=example,
        python_model=pyfunc.__file__,
        artifacts=artifacts,
        metadata={"outputs": pyfunc.OUTPUTS},
        # Explicit requirements: inferring them costs ~10 s per log.
        pip_requirements=pyfunc.pip_requirements(),
    )


def _log_pytorch_flavor(weights: Path, example: np.ndarray):
    import mlflow.pytorch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from vae_pipeline.train.checkpoint import load_model

    model, _ = load_model(weights)
    # Batch 2: torch.export makes a size-1 dimension static; this keeps the batch dynamic.
    batch = np.repeat(example, 2, axis=0)
    c, h, w = example.shape[1:]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, c, h, w))]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, c, h, w), "reconstruction"),
                TensorSpec(np.dtype(np.float32), (-1, model.latent_dim), "mu"),
                TensorSpec(np.dtype(np.float32), (-1, model.latent_dim), "logvar"),
            ]
        ),
    )
    return mlflow.pytorch.log_model(
        model.eval(),
        name=TORCH_ARTIFACT,
        signature=signature,
        input_example=batch,
        validate_serving_input=False,  # its pyfunc wants one output tensor; ours is a tuple
        serialization_format="pt2",
        pip_requirements=_torch_requirements(),
    )


def _torch_requirements() -> list[str]:
    from vae_pipeline import pyfunc

    return [r for r in pyfunc.pip_requirements() if r.split("==")[0] in ("torch", "numpy")]


def _signature(weights: Path):
    """Input signature float32 (N, C, H, W) with the `output` and `k` params declared (MLflow
    drops predict params the signature does not declare), and a one-image input example. No
    output schema: each `output` has its own dtype and shape (`pyfunc.OUTPUTS`, recorded in the
    model's metadata), which one tensor spec could not tell truthfully."""
    import torch
    from mlflow.models import infer_signature

    hp = torch.load(weights, map_location="cpu", weights_only=True)["hparams"]
    example = np.zeros((1, hp["in_channels"], hp["image_size"], hp["image_size"]), np.float32)
    from vae_pipeline.pyfunc import DEFAULT_IW_K

    params = {"output": "latent_mean", "k": DEFAULT_IW_K}
    return infer_signature(example, None, params=params), example


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, status=status)


def reopen_run(uri: str, run_id: str) -> None:
    """A re-run of a failed retrain continues its run: FAILED/KILLED back to RUNNING."""
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)  # raises, naming the run, when it was deleted
    if run.info.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow run {run_id} was deleted; re-run the retrain with force=True (--force)"
        )
    if run.info.status in ("FAILED", "KILLED"):
        client.update_run(run_id, status="RUNNING")
        log.info("continuing MLflow run %s (it was %s)", run_id, run.info.status)


LOCAL_UI = "http://127.0.0.1:5000"


def ui_links(uri: str, run_id: str, model_name: str, version: str) -> dict[str, str]:
    """Links to the run and the model version in the MLflow UI. For a local store they point
    at `mlflow ui` on its default address, and `note` says how to start it."""
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    scheme = urlsplit(uri).scheme
    base = str(redact(uri)).rstrip("/") if scheme in ("http", "https") else LOCAL_UI
    links = {
        "run": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
        "model_version": f"{base}/#/models/{model_name}/versions/{version}",
    }
    if base == LOCAL_UI:
        links["note"] = (
            f"The links need the MLflow UI on the local store: `mlflow ui --backend-store-uri "
            f"{redact(uri)}`"
        )
    return links


def download_weights(uri: str, model_uri: str, dest: Path | None = None) -> Path:
    """Fetch a logged/registered model's weights file (e.g. models:/conv-vae@champion)."""
    from vae_pipeline.evaluate.model_file import WEIGHTS_FILE

    client_for(uri)
    dest = Path(dest or tempfile.mkdtemp(prefix="vae-model-"))
    try:
        local = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dest))
        )
    except MlflowException as exc:
        # an alias no version has (no champion promoted yet), a model or version not registered
        if model_uri.startswith("models:/") and exc.error_code in (
            "RESOURCE_DOES_NOT_EXIST",
            "INVALID_PARAMETER_VALUE",
        ):
            said = exc.message.removeprefix(f"{exc.error_code}: ").rstrip(".")
            raise UserError(
                f"{model_uri} is not in the registry at {redact(uri)}: {said}; see which "
                "version has which alias with `vae-pipeline history`, or name a version "
                "(models:/NAME/VERSION)"
            ) from None
        raise
    found = sorted(local.rglob(WEIGHTS_FILE))
    if found:
        return found[0]
    if not any(p.is_file() for p in local.rglob("*")):
        raise UserError(
            f"the artifacts of {model_uri} are missing: nothing at {_artifact_location(model_uri)}, "
            "where the registry says they are (the artifact store lost them, e.g. an in-memory S3 "
            "that was restarted); register the model again, or restore that store"
        )
    raise UserError(f"{model_uri} holds no {WEIGHTS_FILE}: not a vae-pipeline model")


def _artifact_location(model_uri: str) -> str:
    """Where the artifact store keeps a models:/ or runs:/ URI's files (for error messages)."""
    try:
        if model_uri.startswith("models:/"):
            from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository

            return redact(ModelsArtifactRepository.get_underlying_uri(model_uri))
        if model_uri.startswith("runs:/"):
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

            return redact(RunsArtifactRepository.get_underlying_uri(model_uri))
    except Exception:  # the message is the point: never fail while writing it
        pass
    return redact(model_uri)
