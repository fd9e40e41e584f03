"""The retrain's steps as plain functions: the CLI and the Prefect tasks are thin wrappers.

ingest -> prepare -> train -> evaluate -> register -> promote
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import torch

from vae_pipeline import lineage, tracking, versioning
from vae_pipeline.config import Config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.data.dataset import read_manifest, resolve_label
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.errors import UserError
from vae_pipeline.evaluate import evaluate
from vae_pipeline.model import ConvVAE
from vae_pipeline.registry.promotion import Decision, promote_if_better
from vae_pipeline.registry.versions import register as register_version
from vae_pipeline.registry.versions import version_of_run, version_tags
from vae_pipeline.train.checkpoint import load as load_weights_meta
from vae_pipeline.train.checkpoint import load_model
from vae_pipeline.train.data import holdout_label
from vae_pipeline.train.distributed import pick_device
from vae_pipeline.train.launch import launch, launch_evaluation

log = logging.getLogger(__name__)


def ingest(cfg: Config, workdir: Path = Path("."), push: bool = True) -> str:
    """Snapshot the source into the raw area and version it with DVC; returns the data version."""
    snapshot_source(cfg, workdir)
    version = versioning.version_data(cfg, workdir, push=push)
    remote = lineage.remote_info(cfg, workdir)
    if push and not remote["shared"]:
        log.warning("%s", lineage.unshared_note(remote))
    return version


def prepare_data(cfg: Config, workdir: Path = Path(".")) -> dict:
    version = versioning.read_data_version(cfg, workdir) or "unversioned"
    return prepare(cfg, workdir, data_version=version)


def train(
    cfg: Config, workdir: Path = Path("."), out_dir: Path | None = None, run_id: str | None = None
) -> Path:
    """torchrun with `train.nproc_per_node` ranks; rank 0 logs epochs into MLflow run `run_id`.

    The tracking URI is not passed on the command line (it may hold credentials): the ranks
    resolve it from the same config, environment and working directory as this process.
    """
    out_dir = Path(out_dir or cfg.train.out_dir)
    holdout_label(cfg, workdir / cfg.data.prepared_dir)  # a bad name fails here, not in ranks
    return launch(cfg, out_dir, workdir, ["--mlflow-run-id", run_id] if run_id else [])


def load_model_ref(cfg: Config, ref: str, workdir: Path = Path(".")) -> tuple[ConvVAE, dict]:
    """A model from a local file/dir (model.pt) or an MLflow URI (models:/conv-vae@champion).

    A registered model's calibrated anomaly threshold (anomaly.json beside its weights) comes
    back as meta["anomaly"]."""
    if "://" in ref or ref.startswith("models:/") or ref.startswith("runs:/"):
        weights = tracking.download_weights(tracking_uri(cfg, workdir), ref)
    else:
        path = workdir / ref
        weights = path / "model.pt" if path.is_dir() else path
    model, meta = load_model(weights)
    anomaly = weights.parent / tracking.ANOMALY_FILE
    if anomaly.is_file():
        meta["anomaly"] = json.loads(anomaly.read_text())
    return model, meta


def evaluate_model(
    cfg: Config, model_ref: str, workdir: Path = Path("."), device: torch.device | None = None
) -> dict:
    """Evaluate a model (file, train dir or MLflow URI) on the prepared test split.

    With `evaluate.nproc_per_node` > 1, and not already inside a torchrun job, this launches
    torchrun and the ranks share the test examples; the metrics come back from metrics.json.
    """
    if cfg.evaluate.nproc_per_node > 1 and not torch.distributed.is_initialized():
        launch_evaluation(cfg, model_ref, workdir)
        return json.loads((workdir / cfg.evaluate.reports_dir / "metrics.json").read_text())
    model, meta = load_model_ref(cfg, model_ref, workdir)
    names = read_manifest(workdir / cfg.data.prepared_dir).get("label_names") or []
    check_holdout(cfg, meta, model_ref, list(names))
    history_path = (
        (workdir / model_ref / "history.json") if (workdir / model_ref).is_dir() else None
    )
    history = (
        json.loads(history_path.read_text()) if history_path and history_path.is_file() else None
    )
    if device is None:
        device = pick_device(cfg.train.device)
    return evaluate(cfg, model, workdir, history=history, device=device)


def check_holdout(cfg: Config, meta: dict, model_ref: str, label_names: list[str]) -> None:
    """The model must have been trained without anomaly.holdout_class (and only without it):
    otherwise its AUROC would measure something else. A file saved without the field (a bare
    `save_model(model, path)`) counts as trained on every class."""
    held = resolve_label(cfg.anomaly.holdout_class, label_names, "anomaly.holdout_class")
    wanted = None if held is None else label_names[held]
    trained = meta.get("holdout_class")
    if wanted != trained:
        raise UserError(
            f"{model_ref} was trained without class {trained!r} but anomaly.holdout_class="
            f"{cfg.anomaly.holdout_class!r}: evaluate it with --set "
            f"anomaly.holdout_class={trained or 'null'}"
        )


def register(
    cfg: Config,
    run_id: str,
    weights: Path,
    metrics: dict,
    workdir: Path = Path("."),
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log evaluation + model into the run, register it with lineage tags; returns the version."""
    uri = tracking_uri(cfg, workdir)
    done = version_of_run(uri, cfg.registry.model_name, run_id)
    if done is not None:  # a retried step: this run's model is registered already
        return done
    blob = load_weights_meta(weights)
    check_registrable(blob, metrics, weights)
    tracking.log_evaluation(uri, run_id, metrics, workdir / cfg.evaluate.reports_dir)
    model_uri, torch_uri = tracking.log_model(
        uri, run_id, weights, tracking.anomaly_record(metrics)
    )
    data_version = str(blob.get("data_version", "unknown"))
    tags = {
        "git_commit": versioning.git_commit(workdir),
        # The data the weights were trained on (their own record); the test side is in version_tags.
        "data_version": data_version,
        # params, data pointer and remote as lineage/ artifacts of the run
        **lineage.record(
            cfg, uri, run_id, workdir, data_version, str(metrics.get("data_version") or "")
        ),
        "params_hash": cfg.params_hash(),
        "pytorch_model_uri": torch_uri,
        **version_tags(metrics),
        **(extra_tags or {}),
    }
    return register_version(uri, cfg.registry.model_name, model_uri, run_id, tags)


def check_registrable(blob: dict, metrics: dict, weights: Path) -> None:
    """A model with non-finite weights or test metrics is never registered."""
    bad = [k for k in ("elbo", "recon", "kl", "iw_nll") if not math.isfinite(float(metrics[k]))]
    bad += [k for k, t in blob["state_dict"].items() if not torch.isfinite(t).all()]
    if bad:
        raise UserError(
            f"not registering {weights}: non-finite values in {', '.join(bad[:5])}; retrain "
            "(lower train.lr); the registry and the champion are unchanged"
        )


def promote(
    cfg: Config, version: str, workdir: Path = Path("."), actor: str | None = None
) -> Decision:
    return promote_if_better(cfg, tracking_uri(cfg, workdir), version, workdir, actor)
