"""The environment: the one place that reads it. Every variable the pipeline reads, itself or
through the libraries it drives, and the settings that keep Prefect, MLflow and DVC offline and
quiet."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vae_pipeline.config import Config

# Every environment variable the pipeline reads, itself or through the libraries it drives
# (MLflow, Prefect, boto3 and DVC), and what for. Deployment manifests (infra/compose.yaml,
# infra/k8s/) set names from this list only; tests/test_infra.py checks both directions.
ENVIRONMENT: dict[str, str] = {
    "MLFLOW_TRACKING_URI": "MLflow tracking server (registry.tracking_uri wins; else SQLite)",
    "MLFLOW_TRACKING_USERNAME": "MLflow basic-auth user (read by the MLflow client)",
    "MLFLOW_TRACKING_PASSWORD": "MLflow basic-auth password (read by the MLflow client)",
    "PREFECT_API_URL": "Prefect server API (unset = an ephemeral in-process server)",
    "PREFECT_API_KEY": "Prefect Cloud API key (read by the Prefect client)",
    "PREFECT_API_AUTH_STRING": "user:password of a Prefect server with basic auth (Prefect client)",
    "PREFECT_HOME": "Prefect's local state: cached task results (default <workdir>/.prefect)",
    "AWS_ACCESS_KEY_ID": "S3 credentials for data sources, the DVC remote and MLflow artifacts",
    "AWS_SECRET_ACCESS_KEY": "S3 credentials (secret)",
    "AWS_DEFAULT_REGION": "S3 region",
    "AWS_PROFILE": "a profile in ~/.aws/credentials instead of keys",
    "AWS_ENDPOINT_URL": "S3-protocol endpoint (MinIO, moto); unset = AWS",
    "AWS_ENDPOINT_URL_S3": "S3 endpoint for S3 only (wins over AWS_ENDPOINT_URL)",
    "MLFLOW_S3_ENDPOINT_URL": "S3 endpoint of the MLflow client's direct artifact access",
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "torchrun: a rendezvous store per restart (set by us)",
    "CUBLAS_WORKSPACE_CONFIG": "cuBLAS workspace; train.deterministic sets :4096:8 when unset",
    "XDG_CACHE_HOME": "where the step-probe cache lives (train.autotune_cache wins)",
}


# Set by torchrun for each rank; never set by hand.
TORCHRUN_ENVIRONMENT = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")


QUIET_OFFLINE = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_UI_ENABLED": "false",
    # The default 20 s can time out on 2 cores.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    # Artifacts stream through the MLflow server rather than from presigned URLs of its S3
    # store, whose endpoint is often one only the server reaches (compose's http://minio:9000);
    # MLflow 3 servers with S3 artifacts offer presigned downloads and clients use them unless
    # this says no.
    "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "GIT_PYTHON_REFRESH": "quiet",
}


def apply_quiet_offline_defaults(workdir: str | os.PathLike = ".") -> None:
    """Keep Prefect, MLflow and DVC offline and quiet unless the user already chose otherwise.

    Must run before prefect is imported (it reads its settings at import).
    """
    for key, value in QUIET_OFFLINE.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("PREFECT_HOME", str(Path(workdir, ".prefect").resolve()))


def tracking_uri(cfg: Config, workdir: str | os.PathLike = ".") -> str:
    """registry.tracking_uri, else MLFLOW_TRACKING_URI, else an SQLite store in the workdir."""
    if cfg.registry.tracking_uri:
        return cfg.registry.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return "sqlite:///" + str(Path(workdir, "mlflow.db").resolve())


def autotune_cache_path(cfg: Config) -> Path:
    """Where step-probe results are cached: train.autotune_cache, else the user's cache."""
    if cfg.train.autotune_cache:
        return Path(cfg.train.autotune_cache).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "vae-pipeline", "step-plans.json")


def s3_endpoint_url() -> str | None:
    """The S3 endpoint (MinIO, moto) from the standard AWS variables; None = AWS itself."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
