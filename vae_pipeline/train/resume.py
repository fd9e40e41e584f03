"""Exact resume: what a checkpoint holds and how a run continues from it.

A checkpoint (at each epoch's end, and every `train.checkpoint_every` steps) holds the weights,
Adam's state, the epoch and the step within it, the noise generator's state, the global RNG
states (as tensors and plain values: it loads with `torch.load(weights_only=True)`) and the
epoch's partial sums, with a fingerprint of the settings a resumed run must share. The
Trainer's `Checkpointer` writes and loads it, and the final model.pt and history.json.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vae_pipeline.config import Config
from vae_pipeline.train import checkpoint
from vae_pipeline.train.distributed import DistEnv, all_reduce_sum, barrier
from vae_pipeline.train.step import StepPlan, TrainingError
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
    """Restore `rng_states()`. CUDA states only for the GPUs this host has (a checkpoint
    written on a host with more keeps the rest unused; with none, the CUDA states are unused)."""
    torch.set_rng_state(state["torch"])
    cuda = state["cuda"] if torch.cuda.is_available() else []
    visible = torch.cuda.device_count() if cuda else 0
    for index, cuda_state in enumerate(cuda[:visible]):
        torch.cuda.set_rng_state(cuda_state, index)
    if len(cuda) > visible:
        log.warning(
            "the checkpoint holds CUDA RNG states of %d GPUs, this host has %d: the rest are "
            "not restored",
            len(cuda),
            visible,
        )
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# Settings that change the trajectory besides the batch size, the learning rate, the seed and
# the KL warm-up: a checkpoint resumes only under the same values.
TRAJECTORY_SETTINGS = ("binarize", "objective", "iw_samples", "lr_schedule", "lr_min")


def resume_fingerprint(cfg: Config) -> dict:
    """Settings a checkpoint must share with the run that resumes it (epochs may grow, unless
    a cosine schedule spans them; the world size may change: the batches, the noise and the
    binarization do not depend on it)."""
    train = cfg.train.model_dump(
        mode="json", include={"batch_size", "lr", "seed", "kl_warmup_steps", *TRAJECTORY_SETTINGS}
    )
    if cfg.train.lr_schedule != "constant":
        train["epochs"] = cfg.train.epochs
    if cfg.train.lr_warmup_steps and cfg.train.lr > cfg.train.lr_warmup_start:
        # only where it acts: a checkpoint at lr <= the start resumes as before it existed
        train["lr_warmup"] = [cfg.train.lr_warmup_steps, cfg.train.lr_warmup_start]
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


@dataclass
class Progress:
    """How far a training is: what a checkpoint holds besides the weights, Adam's state and
    the RNG states. The Trainer advances it; its Checkpointer saves and restores it."""

    epoch: int = 0  # completed epochs
    global_step: int = 0  # optimizer steps taken (or skipped) so far, for the KL warm-up
    bad_steps: int = 0  # skipped non-finite steps so far (train.max_bad_steps)
    history: list[dict] = field(default_factory=list)  # one record per completed epoch


@dataclass
class EpochProgress:
    """One epoch's running state on this rank. A mid-epoch checkpoint stores its `position`
    (with the RNG states at the epoch's start), and a restart continues from that."""

    rng: dict[str, Any]  # the global RNG states at the epoch's start
    noise: torch.Generator  # the reparameterisation noise's generator
    sums: torch.Tensor  # per-example sums (-ELBO, recon, KL, -objective), on the device
    count: torch.Tensor  # images in the sums
    skipped: int  # non-finite steps skipped in this epoch
    t0: float  # when the epoch started (earlier by a resumed epoch's seconds so far)
    seen: int = 0  # images this process trained on (for the rate it logs)
    first_bad: torch.Tensor | None = None  # this rank's first non-finite step (stop mode)

    @classmethod
    def begin(
        cls,
        rng: dict[str, Any],
        noise: torch.Generator,
        device: torch.device,
        resume: dict | None,
        is_main: bool,
    ) -> EpochProgress:
        """A fresh epoch, or the rest of the one a mid-epoch checkpoint's `resume` left."""
        sums = torch.zeros(4, dtype=torch.float64, device=device)
        count = torch.zeros(1, dtype=torch.float64, device=device)
        run = cls(rng, noise, sums, count, 0, time.perf_counter())
        if resume:
            written_on = resume.get("noise_device", "cpu")
            if written_on == noise.device.type:
                noise.set_state(resume["noise"])
            else:  # CPU and CUDA generators cannot take each other's state
                log.warning(
                    "the checkpoint's noise generator was on %s, this run's is on %s: the rest "
                    "of the epoch draws other noise than the uninterrupted run would",
                    written_on,
                    noise.device.type,
                )
            run.skipped = resume["skipped"]
            run.t0 -= resume["seconds"]
            if is_main:  # the partial sums are global: rank 0 carries them
                sums += resume["sums"].to(device)
                count += resume["count"]
        run.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        return run

    def add(self, batch_sums: torch.Tensor, images: int) -> None:
        self.sums += batch_sums
        self.count += images
        self.seen += images

    def note(self, step: int, finite: torch.Tensor) -> None:
        """Stop mode: keep this rank's first non-finite step, on the device (no host sync)."""
        # the step is a kernel argument, not a tensor built on the host and copied
        self.first_bad.masked_fill_((~finite) & (self.first_bad < 0), step)

    def position(self, step: int) -> dict:
        """A mid-epoch checkpoint's position after `step` steps of the epoch, with the partial
        sums over every rank (two all-reduces: every rank calls this)."""
        return {
            "step": step,
            "noise": self.noise.get_state(),
            "noise_device": self.noise.device.type,
            "sums": all_reduce_sum(self.sums.clone()).cpu(),
            "count": all_reduce_sum(self.count.clone()).item(),
            "skipped": self.skipped,
            "seconds": time.perf_counter() - self.t0,
            "rng": self.rng,
        }


class Checkpointer:
    """A training's files in `out_dir`: the checkpoint (written and loaded) and, at the end,
    model.pt and history.json. The model, the optimizer and the progress are the trainer's
    own objects: `load` restores them in place."""

    def __init__(
        self,
        cfg: Config,
        env: DistEnv,
        out_dir: Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        progress: Progress,
        *,
        plan: StepPlan,
        data_version: str,
        iw_samples: int,
        holdout_class: str | None,
        workdir: Path,
        device: torch.device,
    ):
        self.cfg, self.env, self.out_dir = cfg, env, Path(out_dir)
        self.model, self.optimizer, self.progress = model, optimizer, progress
        self.plan, self.data_version, self.iw_samples = plan, data_version, iw_samples
        # The class the model never saw (label name), or None: evaluation checks it.
        self.holdout_class = holdout_class
        self.workdir, self.device = Path(workdir), device
        self.path = self.file(self.out_dir)
        self.last = "none yet"  # what a restart would resume from, in words
        if env.is_main and self.out_dir.is_dir():
            for tmp in checkpoint.remove_stale_temp_files(self.out_dir):
                log.info("removed %s, left by a write that died", tmp)

    @staticmethod
    def file(out_dir: Path) -> Path:
        """The checkpoint of a training into `out_dir`."""
        return Path(out_dir) / "checkpoint.pt"

    def save(self, position: dict | None = None) -> None:
        """Rank 0 writes (atomically: a crash mid-write leaves the last one loadable); every
        rank waits for it, so a rank killed after this point resumes from here.

        `position` marks a mid-epoch checkpoint: the step within epoch `epoch + 1`, the noise
        generator's state, the RNG states at the epoch's start and the partial sums."""
        epoch = self.progress.epoch
        if self.env.is_main:
            if not all(torch.isfinite(p).all() for p in self.model.parameters()):
                where = (
                    f"epoch {epoch + 1}, step {position['step']}" if position else f"epoch {epoch}"
                )
                raise TrainingError(
                    f"non-finite weights after {where}; no checkpoint written (the last one is "
                    "intact): lower train.lr"
                )
            checkpoint.atomic_save(
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "epoch": epoch,
                    "global_step": self.progress.global_step,
                    "bad_steps": self.progress.bad_steps,
                    "position": position,
                    "rng": rng_states() if position is None else position.pop("rng"),
                    "history": self.progress.history,
                    "fingerprint": resume_fingerprint(self.cfg),
                    "data_version": self.data_version,
                    # the plan, with the device and world size it was chosen for (a resumed
                    # run re-validates it against its own)
                    "step_plan": {
                        **self.plan.as_dict(),
                        "device": self.device.type,
                        "world_size": self.env.world_size,
                    },
                },
                self.path,
            )
        barrier()
        # every rank knows what a restart would resume from (for its error messages)
        self.last = describe_checkpoint({"epoch": epoch, "position": position})

    def load(self) -> dict | None:
        """Resume from the checkpoint, if there is one: the weights, Adam's state, the progress
        and the RNG states are restored in place. Returns a mid-epoch checkpoint's position
        (where in epoch `progress.epoch + 1` to go on), else None."""
        if not self.path.is_file():
            return None
        try:
            state = checkpoint.load(self.path)
        except checkpoint.CheckpointError as exc:
            raise TrainingError(str(exc)) from None
        if state["fingerprint"] != resume_fingerprint(self.cfg):
            raise TrainingError(
                f"checkpoint {self.path} was made with other data/model/train params; "
                "delete it or train into another out dir (--out-dir)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        progress = self.progress
        progress.epoch, progress.history = state["epoch"], state["history"]
        progress.global_step, progress.bad_steps = state["global_step"], state["bad_steps"]
        set_rng_states(state["rng"])
        position = state["position"]
        self.last = describe_checkpoint(state)
        if position:
            log.info(
                "resumed from %s at epoch %d, step %d",
                self.path,
                progress.epoch + 1,
                position["step"],
            )
        else:
            log.info("resumed from %s after epoch %d", self.path, progress.epoch)
        return position

    def write_outputs(self) -> None:
        """Rank 0 writes the final model.pt (with its lineage) and history.json."""
        if not self.env.is_main:
            return
        checkpoint.save_model(
            self.model.cpu(),
            self.out_dir / "model.pt",
            data_version=self.data_version,
            params_hash=self.cfg.params_hash(),
            git_commit=git_commit(self.workdir),
            epochs=self.progress.epoch,
            train_binarize=self.cfg.train.binarize,
            objective=self.cfg.train.objective,
            iw_samples=self.iw_samples,
            holdout_class=self.holdout_class,
        )
        self.model.to(self.device)
        (self.out_dir / "history.json").write_text(json.dumps(self.progress.history, indent=2))
