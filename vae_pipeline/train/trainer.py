"""The trainer: one process, or one rank of a torchrun job (DDP). Same code, same results.

Determinism across world sizes: with a fixed global batch, DistributedSampler gives rank r the
examples r, r+W, r+2W, ... of each global batch, and every rank draws the reparameterisation
noise for the whole global batch from one generator seeded by (seed, epoch), keeping rows r::W.
So 1 process and W ranks see the same examples with the same noise, and DDP's gradient average
of per-rank means equals the global mean.

Exact resume: a restart resumes from the last checkpoint at the exact step, with the same
batches and noise (train/resume.py says what a checkpoint holds); the final weights equal those
of an uninterrupted run. The data path (resident split or loader, the sampler's order) is
train/data.py; one step's maths, train/step.py.

Dynamic binarization (`train.binarize: dynamic`) is keyed by (seed, epoch, the image's index in
the training split) through a counter-based hash (`vae_pipeline.binarize`): like the noise, it
is the same for any world size and across a resume. The cosine learning-rate schedule is a
function of the optimizer step, so it needs no state of its own.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch

from vae_pipeline.binarize import binarize
from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.model import ConvVAE
from vae_pipeline.train import autotune
from vae_pipeline.train.data import holdout_label, training_data
from vae_pipeline.train.distributed import DistEnv, all_reduce_sum, barrier
from vae_pipeline.train.resume import Checkpointer, EpochProgress, Progress, rng_states
from vae_pipeline.train.step import (
    CompileWatch,
    TrainingError,
    apply_determinism,
    build_network,
    learning_rate,
    micro_batches,
)
from vae_pipeline.train.validation import validate

log = logging.getLogger(__name__)

# Called on global rank 0 after each epoch's checkpoint with the epoch's record and the model
# (tracking.EpochLogger, tracking.CheckpointModels); it must not change the model.
EpochCallback = Callable[[dict, ConvVAE], None]


class Trainer:
    def __init__(
        self,
        cfg: Config,
        out_dir: Path,
        env: DistEnv = DistEnv(),
        device: torch.device = torch.device("cpu"),
        workdir: Path = Path("."),
        callbacks: tuple[EpochCallback, ...] = (),
    ):
        self.cfg, self.env, self.device = cfg, env, device
        self.out_dir, self.workdir, self.callbacks = Path(out_dir), Path(workdir), callbacks
        tc = cfg.train
        if tc.batch_size % (env.world_size * tc.grad_accum_steps):
            raise TrainingError(
                f"train.batch_size={tc.batch_size} must be divisible by the world size "
                f"{env.world_size} (nnodes x nproc_per_node) times train.grad_accum_steps="
                f"{tc.grad_accum_steps}"
            )
        self.local_batch = tc.batch_size // env.world_size
        prepared = workdir / cfg.data.prepared_dir
        # The anomaly benchmark's held-out class is in neither training nor validation.
        self.holdout = holdout_label(cfg, prepared)
        self.train_set = PreparedSplit(prepared, "train", self.holdout)
        self.val_set = PreparedSplit(prepared, "val", self.holdout)
        if len(self.train_set) < tc.batch_size:
            raise TrainingError(
                f"training split has {len(self.train_set)} images, fewer than "
                f"train.batch_size={tc.batch_size}: lower the batch size or add data"
            )
        apply_determinism(tc.deterministic, device)
        box = self.train_set.manifest.get("content_box")
        self.plan = autotune.plan_for_rank(
            cfg,
            device,
            env,
            self.local_batch // tc.grad_accum_steps,
            Checkpointer.file(out_dir),
            box,
        )
        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        net = build_network(cfg, self.plan, device, env, box)
        self.compile_watch = CompileWatch(self.plan)
        self.model, self.optimizer, self.ddp, self.net = net.model, net.optimizer, net.ddp, net.net
        self.memory_format, self.autocast = net.memory_format, net.autocast
        data = training_data(cfg, env, device, self.train_set, self.val_set)
        self.sampler, self.batches, self.val_data = data.sampler, data.batches, data.val_data
        self.data_reason = data.reason
        self.progress = Progress()  # epochs, steps and bad steps so far, the epochs' records
        self._resume: dict | None = None  # a mid-epoch checkpoint's position, until used
        self.steps_per_epoch = len(self.train_set) // tc.batch_size
        # K posterior samples per image for the iwae objective (1 = the plain ELBO)
        self.iw_samples = tc.iw_samples if tc.objective == "iwae" else 1
        # the KL weight as the iwae step takes it: a 0-d device tensor, updated in place (a
        # compiled step neither recompiles for a new value nor reads a CPU scalar)
        self.beta = torch.ones((), device=device)
        self.skip_mode = tc.max_bad_steps > 0  # skip non-finite steps, else stop at the first
        labels = self.train_set.manifest.get("label_names")
        self.checkpointer = Checkpointer(
            cfg,
            env,
            self.out_dir,
            self.model,
            self.optimizer,
            self.progress,
            plan=self.plan,
            data_version=self.train_set.manifest.get("data_version", "unversioned"),
            iw_samples=self.iw_samples,
            holdout_class=None if self.holdout is None else labels[self.holdout],
            workdir=self.workdir,
            device=device,
        )

    # --- one step, one epoch ---------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run (the cosine schedule's length)."""
        return self.cfg.train.epochs * self.steps_per_epoch

    def _epoch_noise(self, epoch: int) -> torch.Generator:
        """The epoch's noise generator, on the device: the noise is drawn where it is used (no
        host-to-device copy per step). CPU and CUDA generators differ, so the noise (and the
        trajectory) differs between the two; for one device type it is the same for any world
        size and across a resume."""
        seed = self.cfg.train.seed * 1_000_003 + epoch
        return torch.Generator(device=self.device).manual_seed(seed)

    def _step_noise(self, noise: torch.Generator) -> torch.Tensor:
        """This rank's reparameterisation noise for one step: drawn for the whole global batch
        (K samples each for iwae) and sliced rank::world, so it is the same for any world size.
        (batch, latent) for the ELBO; (K, batch, latent) for iwae with K > 1."""
        shape = (self.iw_samples, self.cfg.train.batch_size, self.cfg.model.latent_dim)
        eps = torch.randn(shape, generator=noise, device=self.device)
        eps = eps[:, self.env.rank :: self.env.world_size]
        return eps[0] if self.iw_samples == 1 else eps

    def kl_weight(self) -> float:
        """beta for the next step: rises linearly from 0 to 1 over train.kl_warmup_steps."""
        warmup = self.cfg.train.kl_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, self.progress.global_step / warmup)

    def _run_batch(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step over train.grad_accum_steps micro-batches; returns the
        per-example sums (-ELBO, recon, KL, -objective; on the device) and whether the loss
        and gradients were finite (a device bool: no host sync here).

        `eps` is (batch, latent) for the ELBO, (K, batch, latent) for the iwae objective."""
        accum = self.cfg.train.grad_accum_steps
        beta = self.kl_weight()
        if self.cfg.train.kl_warmup_steps:
            self.beta.fill_(beta)  # a kernel with the value as its argument: no copy, no sync
        lr = learning_rate(self.cfg.train, self.progress.global_step, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        sums = torch.zeros(4, dtype=torch.float64, device=x.device)
        finite = torch.ones((), dtype=torch.bool, device=x.device)
        iwae = eps.dim() == 3
        for i, (xm, em) in enumerate(micro_batches(x, eps, accum)):
            # DDP all-reduces the gradients on the last micro-batch only
            last = i == accum - 1 or self.ddp is None
            with nullcontext() if last else self.ddp.no_sync():
                if iwae:
                    terms = self.net(xm, em, self.beta)
                    objective = terms["iwae"]
                    loss = -objective.mean()
                else:
                    terms = self.net(xm, em)
                    objective = terms["elbo"]
                    if beta == 1.0:
                        loss = -objective.mean()  # nats per example
                    else:  # KL warm-up: the optimised loss; the reported one stays -ELBO
                        loss = (terms["recon"] + beta * terms["kl"]).mean()
                loss = loss / accum
                loss.backward()
            finite &= torch.isfinite(loss.detach())
            sums += torch.stack(
                [
                    -terms["elbo"].sum(),
                    terms["recon"].sum(),
                    terms["kl"].sum(),
                    -objective.detach().sum(),
                ]
            )
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # DDP has averaged the gradients: a NaN on any rank is a NaN on every rank.
        finite &= torch.isfinite(torch.nn.utils.get_total_norm(grads))
        if self.cfg.train.max_bad_steps > 0:
            # Skip mode decides before stepping: one host sync per step, by choice.
            bad = all_reduce_sum((~finite).to(torch.float64).reshape(1))
            if bad.item() > 0:  # on any rank: every rank skips, so weights stay in sync
                self.optimizer.zero_grad(set_to_none=True)
                return torch.zeros(4, dtype=torch.float64, device=x.device), bad[0] == 0
        self.optimizer.step()
        # Per-example sums stay on the device: no host sync until a logging point.
        return sums.detach(), finite

    def _non_finite(self, epoch: int, step: int, what: str) -> TrainingError:
        local = self.local_batch  # the batch: this rank's training-set indices at `step`
        batch = self.sampler.order()[step * local : (step + 1) * local]
        shown = ", ".join(map(str, batch[:8])) + (", ..." if len(batch) > 8 else "")
        last = self.checkpointer.last
        return TrainingError(
            f"{what} at epoch {epoch + 1}, step {step + 1} (batch of training images "
            f"[{shown}] on rank {self.env.rank}); no checkpoint written after it (the last is "
            f"{last}). Lower train.lr, check those images, or set train.max_bad_steps to skip "
            "such steps"
        )

    def _check_finite(self, epoch: int, first_bad: torch.Tensor) -> None:
        """Stop mode: raise if any rank saw a non-finite step (a host sync: logging points and
        the epoch's end only). All ranks agree through one all-reduce, so all raise together."""
        flag = all_reduce_sum((first_bad >= 0).to(torch.float64).reshape(1))
        if flag.item() > 0:
            step = int(first_bad.item())
            if step < 0:  # another rank's; its own message names its batch
                raise TrainingError(
                    f"non-finite loss or gradient in epoch {epoch + 1} on another rank; "
                    "see rank 0's error"
                )
            raise self._non_finite(epoch, step, "non-finite loss or gradient")

    def _run_epoch(self, epoch: int) -> dict:
        self.net.train()
        resume, self._resume = self._resume, None
        start = resume["step"] if resume else 0  # steps a mid-epoch checkpoint already took
        self.sampler.set_epoch(epoch)
        # The RNG states at the epoch's start (before the DataLoader's iterator draws its seed
        # from them): a mid-epoch checkpoint stores these, so a restart replays the same draws.
        epoch_rng = rng_states()
        noise = self._epoch_noise(epoch)
        # this rank's training-set positions for the epoch: the batches, and the keys of the
        # dynamic binarization
        order = torch.tensor(self.sampler.order(), dtype=torch.int64)
        run = EpochProgress.begin(epoch_rng, noise, self.device, resume, self.env.is_main)
        steps = len(order) // self.local_batch
        for step, images, positions in self.batches.epoch(order, self.local_batch, start):
            self._train_step(epoch, step, images, positions, run)
            self._at_log_point(epoch, step, steps, run)
            self._mid_epoch_checkpoint(epoch, step, steps, run)
        return self._epoch_record(epoch, run)

    def _train_step(
        self,
        epoch: int,
        step: int,
        images: torch.Tensor,
        positions: torch.Tensor,
        run: EpochProgress,
    ) -> None:
        """One step of the loop, from the batch's uint8 images on the device. Default (stop)
        mode: no host-device copy and no host sync here (tests/train/test_sync_free.py)."""
        tc = self.cfg.train
        x = to_unit_float(images)
        if tc.binarize != "none":
            x = binarize(x, tc.binarize, tc.seed, epoch, positions)
        x = x.contiguous(memory_format=self.memory_format)
        eps = self._step_noise(run.noise)
        batch_sums, finite = self._run_batch(x, eps)
        self.progress.global_step += 1
        self.compile_watch.first_step_done()
        if not self.skip_mode:
            run.note(step, finite)
        elif self._skipped(epoch, step, finite, run):
            return
        run.add(batch_sums, x.shape[0])

    def _skipped(self, epoch: int, step: int, finite: torch.Tensor, run: EpochProgress) -> bool:
        """Skip mode: whether this non-finite step was skipped (raises past the limit)."""
        if bool(finite):  # synced in _run_batch already
            return False
        run.skipped += 1
        self.progress.bad_steps += 1
        log.warning("%s", self._non_finite(epoch, step, "skipped a non-finite step").args[0])
        limit = self.cfg.train.max_bad_steps
        if self.progress.bad_steps > limit:
            raise self._non_finite(
                epoch, step, f"more than train.max_bad_steps={limit} non-finite steps; the last"
            )
        return True

    def _at_log_point(self, epoch: int, step: int, steps: int, run: EpochProgress) -> None:
        """Every train.log_every steps: stop mode's non-finite check, rank 0's progress line."""
        if (step + 1) % self.cfg.train.log_every:
            return
        self.compile_watch.check(f"epoch {epoch + 1}, step {step + 1}")
        if not self.skip_mode:
            self._check_finite(epoch, run.first_bad)
        if self.env.is_main and run.seen:
            rate = run.seen * self.env.world_size / (time.perf_counter() - run.t0)
            # .item() is a host sync: only at logging points
            log.info(
                "epoch %d step %d/%d  -elbo %.2f  %.0f img/s",
                epoch + 1,
                step + 1,
                steps,
                run.sums[0].item() / run.count.item(),
                rate,
            )

    def _mid_epoch_checkpoint(self, epoch: int, step: int, steps: int, run: EpochProgress) -> None:
        """Every train.checkpoint_every steps, but the epoch's last: a mid-epoch checkpoint."""
        every = self.cfg.train.checkpoint_every
        if every and self.progress.global_step % every == 0 and step + 1 < steps:
            if not self.skip_mode:
                self._check_finite(epoch, run.first_bad)  # never checkpoint after a bad step
            self.checkpointer.save(run.position(step + 1))

    def _epoch_record(self, epoch: int, run: EpochProgress) -> dict:
        """The epoch's end: the last non-finite check, the sums over every rank, the record."""
        if not self.skip_mode:
            self._check_finite(epoch, run.first_bad)
        self.compile_watch.check(f"the end of epoch {epoch + 1}")
        all_reduce_sum(run.sums)
        all_reduce_sum(run.count)
        seconds = time.perf_counter() - run.t0
        n = run.count.item()
        if n == 0:
            raise TrainingError(
                f"every step of epoch {epoch + 1} was non-finite and skipped; no checkpoint "
                "written: lower train.lr or check the data"
            )
        loss, recon, kl, objective = (run.sums / n).tolist()
        step = max(0, self.progress.global_step - 1)  # the epoch's last step, for its lr
        record = {
            "train_loss": loss,
            "train_recon": recon,
            "train_kl": kl,
            "kl_weight": self.kl_weight(),
            "skipped_steps": run.skipped,
            "images_per_s": n / seconds,
            "epoch_seconds": seconds,
            "lr": learning_rate(self.cfg.train, step, self.total_steps),
        }
        if self.iw_samples > 1:  # the optimised bound, -IWAE (K samples), beside -ELBO
            record["train_iwae_loss"] = objective
        return record

    def _validate(self) -> dict:
        return validate(self.model, self.cfg, self.env, self.device, self.val_set, self.val_data)

    # --- the loop --------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `train.epochs`, resuming from `checkpoint.pt` in the out dir if present."""
        self._resume = self.checkpointer.load()
        progress, total = self.progress, self.cfg.train.epochs
        if self.env.is_main:
            tc = self.cfg.train
            log.info(
                "training %d -> %d epochs on %s, world size %d, %d images/epoch; step %s; "
                "objective %s, binarize %s, lr %s; data %s: %s",
                progress.epoch,
                total,
                self.device,
                self.env.world_size,
                self.steps_per_epoch * tc.batch_size,
                self.plan.describe(),
                f"iwae (K={self.iw_samples})" if self.iw_samples > 1 else "elbo",
                tc.binarize,
                f"{tc.lr:g}"
                if tc.lr_schedule == "constant"
                else f"cosine {tc.lr:g} -> {tc.lr_min:g}",
                self.batches.describe(),
                self.data_reason,
            )
        while progress.epoch < total:
            epoch = progress.epoch
            record = {"epoch": epoch + 1, **self._run_epoch(epoch), **self._validate()}
            if not all(math.isfinite(v) for v in record.values()):
                raise TrainingError(
                    f"non-finite loss in epoch {record['epoch']} ({record}); no checkpoint written: "
                    "lower train.lr"
                )
            progress.epoch += 1
            progress.history.append(record)
            self.checkpointer.save()
            if self.env.is_main:
                log.info(
                    "epoch %d/%d  train -elbo %.2f (recon %.2f, kl %.2f)  val -elbo %.2f  "
                    "%.0f img/s  %.1f s",
                    record["epoch"],
                    total,
                    record["train_loss"],
                    record["train_recon"],
                    record["train_kl"],
                    record.get("val_loss", math.nan),
                    record["images_per_s"],
                    record["epoch_seconds"],
                )
                for callback in self.callbacks:
                    callback(record, self.model)
        self.checkpointer.write_outputs()
        barrier()
        return progress.history
