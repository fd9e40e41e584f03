"""A local model for evaluation: its weights file (model.pt, or a train out dir holding one),
the anomaly.json and history.json beside it, the holdout check, and `evaluate_model_file`.

Below the tracking layer on purpose: an evaluation rank (`vae_pipeline.eval_worker`) runs this
on a GPU host that has torch but not MLflow, Prefect, DVC or boto3, so nothing here imports
them. An MLflow URI (models:/..., runs:/...) is downloaded to a local file by the process
that has MLflow (`vae_pipeline.pipeline`) before any rank starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import read_manifest, resolve_label
from vae_pipeline.errors import UserError
from vae_pipeline.evaluate import evaluate
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.checkpoint import load_model
from vae_pipeline.train.distributed import pick_device

# A registered model's calibrated anomaly threshold, beside its weights.
ANOMALY_FILE = "anomaly.json"
WEIGHTS_FILE = "model.pt"
HISTORY_FILE = "history.json"


def is_tracking_uri(ref: str) -> bool:
    """Whether a --model value is an MLflow URI (models:/, runs:/, or any scheme://), not a
    local file or folder."""
    return "://" in ref or ref.startswith(("models:/", "runs:/"))


def local_weights(ref: str, workdir: Path = Path(".")) -> Path:
    """The weights file of a local ref: the file itself, or model.pt in a train out dir."""
    if is_tracking_uri(ref):
        raise UserError(
            f"--model {ref} is an MLflow URI, and this process reads local files only: "
            "download it first (vae-pipeline evaluate does, before it starts the ranks) or "
            "pass a model.pt file or a train out dir"
        )
    path = workdir / ref
    return path / WEIGHTS_FILE if path.is_dir() else path


def load_weights(weights: Path) -> tuple[ConvVAE, dict]:
    """The model in `weights`, and its metadata; a calibrated anomaly threshold beside it
    (anomaly.json, as a registered model has) comes back as meta["anomaly"]."""
    model, meta = load_model(weights)
    anomaly = weights.parent / ANOMALY_FILE
    if anomaly.is_file():
        meta["anomaly"] = json.loads(anomaly.read_text())
    return model, meta


def label_names(cfg: Config, workdir: Path = Path(".")) -> list[str]:
    """The class names of the prepared data (empty when it has none)."""
    return list(read_manifest(workdir / cfg.data.prepared_dir).get("label_names") or [])


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


def training_history(ref: str, workdir: Path = Path(".")) -> list[dict] | None:
    """The per-epoch history of a train out dir (its history.json), for the loss picture;
    None for a bare weights file."""
    path = workdir / ref / HISTORY_FILE
    if not (workdir / ref).is_dir() or not path.is_file():
        return None
    return json.loads(path.read_text())


def evaluate_model_file(
    cfg: Config,
    model_ref: str,
    workdir: Path = Path("."),
    device: torch.device | None = None,
    name: str | None = None,
) -> dict:
    """Evaluate a local model (a model.pt file or a train out dir) on the prepared test split
    in this process, or in this rank of a torchrun job (the ranks share the test examples);
    `name` is the model as the user gave it (an MLflow URI this file was downloaded from),
    for messages."""
    model, meta = load_weights(local_weights(model_ref, workdir))
    check_holdout(cfg, meta, name or model_ref, label_names(cfg, workdir))
    if device is None:
        device = pick_device(cfg.train.device)
    history = training_history(model_ref, workdir)
    return evaluate(cfg, model, workdir, history=history, device=device)
