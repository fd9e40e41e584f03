"""Exact resume: what a checkpoint holds and how a run continues from it.

A checkpoint (at each epoch's end, and every `train.checkpoint_every` steps) holds the weights,
Adam's state, the epoch and the step within it, the noise generator's state, the global RNG
states (as tensors and plain values: it loads with `torch.load(weights_only=True)`) and the
epoch's partial sums, with a fingerprint of the settings a resumed run must share.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_pipeline.config import Config
from vae_pipeline.config.sections import TrainConfig
from vae_pipeline.train import checkpoint
from vae_pipeline.train.distributed import barrier
from vae_pipeline.train.step import TrainingError
from vae_pipeline.versioning import git_commit

log = logging.getLogger(__name__)


def rng_states() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, python) as tensors and plain values, so a
    checkpoint holding them loads with `torch.load(weights_only=True)`."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "python": random.getstate(),
    }


def set_rng_states(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# Settings that change the trajectory, added after checkpoints already existed: part of the
# fingerprint only when not at their default, so an older checkpoint still resumes.
TRAJECTORY_SETTINGS = ("binarize", "objective", "iw_samples", "lr_schedule", "lr_min")


def resume_fingerprint(cfg: Config) -> dict:
    """Settings a checkpoint must share with the run that resumes it (epochs may grow, unless
    a cosine schedule spans them; the world size may change: the batches, the noise and the
    binarization do not depend on it)."""
    train = cfg.train.model_dump(
        mode="json", include={"batch_size", "lr", "seed", "kl_warmup_steps"}
    )
    for name in TRAJECTORY_SETTINGS:
        if getattr(cfg.train, name) != TrainConfig.model_fields[name].default:
            train[name] = getattr(cfg.train, name)
    if cfg.train.lr_schedule != "constant":
        train["epochs"] = cfg.train.epochs
    return {
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "holdout_class": cfg.anomaly.holdout_class,
        "train": train,
    }


def describe_checkpoint(state: dict) -> str:
    """Where a checkpoint would resume, in words: "epoch 2" (its end) or "epoch 3, step 40"."""
    position = state.get("position")
    if position:
        return f"epoch {state['epoch'] + 1}, step {position['step']}"
    return f"epoch {state['epoch']}"


class CheckpointMixin:
    """The Trainer's files: the checkpoint (written and loaded) and, at the end, model.pt and
    history.json (its attributes: cfg, env, model, optimizer, epoch, global_step, bad_steps,
    history, data_version, plan, out_dir, workdir, holdout, train_set, iw_samples, device)."""

    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _save_checkpoint(self, position: dict | None = None) -> None:
        """Rank 0 writes (atomically: a crash mid-write leaves the last one loadable); every
        rank waits for it, so a rank killed after this point resumes from here.

        `position` marks a mid-epoch checkpoint: the step within epoch `self.epoch + 1`, the
        noise generator's state, the RNG states at the epoch's start and the partial sums."""
        if self.env.is_main:
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                where = (
                    f"epoch {self.epoch + 1}, step {position['step']}"
                    if position
                    else (f"epoch {self.epoch}")
                )
                raise TrainingError(
                    f"non-finite weights after {where}; no checkpoint written (the last one is "
                    "intact): lower train.lr"
                )
            checkpoint.atomic_save(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "epoch": self.epoch,
                    "global_step": self.global_step,
                    "bad_steps": self.bad_steps,
                    "position": position,
                    "rng": rng_states() if position is None else position.pop("rng"),
                    "history": self.history,
                    "fingerprint": resume_fingerprint(self.cfg),
                    "data_version": self.data_version,
                    "step_plan": self.plan.as_dict(),
                },
                self.checkpoint_path,
            )
        barrier()
        # every rank knows what a restart would resume from (for its error messages)
        self.last_checkpoint = describe_checkpoint({"epoch": self.epoch, "position": position})

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        try:
            state = checkpoint.load(self.checkpoint_path)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        if state["fingerprint"] != resume_fingerprint(self.cfg):
            raise TrainingError(
                f"checkpoint {self.checkpoint_path} was made with other data/model/train params; "
                "delete it or train into another out dir (--out-dir)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
        self.global_step = state.get("global_step", 0)
        self.bad_steps = state.get("bad_steps", 0)
        if state.get("rng"):
            set_rng_states(state["rng"])
        self._resume = state.get("position")
        self.last_checkpoint = describe_checkpoint(state)
        if self._resume:
            log.info(
                "resumed from %s at epoch %d, step %d",
                self.checkpoint_path,
                self.epoch + 1,
                self._resume["step"],
            )
        else:
            log.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)
        return True

    def _write_outputs(self) -> None:
        if not self.env.is_main:
            return
        checkpoint.save_model(
            self.model.cpu(),
            self.out_dir / "model.pt",
            data_version=self.data_version,
            params_hash=self.cfg.params_hash(),
            git_commit=git_commit(self.workdir),
            epochs=self.epoch,
            train_binarize=self.cfg.train.binarize,
            objective=self.cfg.train.objective,
            iw_samples=self.iw_samples,
            # The class the model never saw (label name), or None: evaluation checks it.
            holdout_class=None
            if self.holdout is None
            else self.train_set.manifest["label_names"][self.holdout],
        )
        self.model.to(self.device)
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=2))
