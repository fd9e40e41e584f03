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
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.errors import UserError
from vae_pipeline.evaluate.model_file import (
    check_holdout,
    evaluate_model_file,
    is_tracking_uri,
    label_names,
    load_weights,
    local_weights,
)
from vae_pipeline.model import ConvVAE
from vae_pipeline.registry.card import SPLIT_SIZES_TAG, write_card
from vae_pipeline.registry.promotion import Decision, promote_if_better
from vae_pipeline.registry.versions import register as register_version
from vae_pipeline.registry.versions import version_of_run, version_tags
from vae_pipeline.train.checkpoint import load as load_weights_meta
from vae_pipeline.train.data import holdout_label
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


def model_weights(cfg: Config, ref: str, workdir: Path = Path(".")) -> Path:
    """The local weights file of a model: a file, a train out dir's model.pt, or an MLflow URI
    (models:/conv-vae@champion, runs:/...) downloaded here, with its anomaly.json beside it."""
    if is_tracking_uri(ref):
        return tracking.download_weights(tracking_uri(cfg, workdir), ref)
    return local_weights(ref, workdir)


def load_model_ref(cfg: Config, ref: str, workdir: Path = Path(".")) -> tuple[ConvVAE, dict]:
    """A model from a local file/dir (model.pt) or an MLflow URI (models:/conv-vae@champion).

    A registered model's calibrated anomaly threshold (anomaly.json beside its weights) comes
    back as meta["anomaly"]."""
    return load_weights(model_weights(cfg, ref, workdir))


def evaluate_model(
    cfg: Config, model_ref: str, workdir: Path = Path("."), device: torch.device | None = None
) -> dict:
    """Evaluate a model (file, train dir or MLflow URI) on the prepared test split.

    An MLflow URI is downloaded here, so the evaluation (in this process or in torchrun's
    ranks) reads a local file and needs no MLflow: a GPU host may not have it. With
    `evaluate.nproc_per_node` > 1, and not already inside a torchrun job, this launches
    torchrun and the ranks share the test examples; the metrics come back from metrics.json.
    """
    local = str(model_weights(cfg, model_ref, workdir)) if is_tracking_uri(model_ref) else model_ref
    if cfg.evaluate.nproc_per_node > 1 and not torch.distributed.is_initialized():
        # a wrong holdout class fails here, naming the model as given, before any rank starts
        _, meta = load_weights(local_weights(local, workdir))
        check_holdout(cfg, meta, model_ref, label_names(cfg, workdir))
        launch_evaluation(cfg, local, workdir)
        return json.loads((workdir / cfg.evaluate.reports_dir / "metrics.json").read_text())
    return evaluate_model_file(cfg, local, workdir, device, name=model_ref)


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
    model_uri, torch_uri, model_id = tracking.log_model(
        uri, run_id, weights, tracking.anomaly_record(metrics)
    )
    data_version = str(blob.get("data_version", "unknown"))
    test_version = str(metrics.get("data_version") or "")
    # params, data pointer and remote as lineage/ artifacts of the run, the splits as its inputs
    recorded = lineage.record(cfg, uri, run_id, workdir, data_version, test_version)
    # the test metrics, linked to the logged model and to the test split they were computed on
    test_split = lineage.dataset_ref("test", test_version or data_version)
    tracking.log_evaluation(
        uri, run_id, metrics, workdir / cfg.evaluate.reports_dir, model_id, test_split
    )
    tags = {
        "git_commit": versioning.git_commit(workdir),
        # The data the weights were trained on (their own record); the test side is in version_tags.
        "data_version": data_version,
        **recorded,
        "params_hash": cfg.params_hash(),
        "pytorch_model_uri": torch_uri,
        SPLIT_SIZES_TAG: split_sizes(cfg, workdir, data_version),
        **version_tags(metrics),
        **(extra_tags or {}),
    }
    version = register_version(uri, cfg.registry.model_name, model_uri, run_id, tags)
    write_card(tracking.client_for(uri), cfg.registry.model_name, version)
    return version


def split_sizes(cfg: Config, workdir: Path, data_version: str) -> str:
    """The prepared splits' sizes, when the prepared data is the version the weights saw."""
    try:
        manifest = json.loads((workdir / cfg.data.prepared_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return "not recorded (no prepared data here)"
    if manifest.get("data_version") != data_version:
        return f"not recorded (the prepared data here is {manifest.get('data_version')})"
    return ", ".join(f"{split} {n}" for split, n in manifest["counts"].items())


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
