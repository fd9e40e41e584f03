"""The trainer: one process, or one rank of a torchrun job (DDP). Same code, same results.

Determinism across world sizes: with a fixed global batch, DistributedSampler gives rank r the
examples r, r+W, r+2W, ... of each global batch, and every rank draws the reparameterisation
noise for the whole global batch from one generator seeded by (seed, epoch), keeping rows r::W.
So 1 process and W ranks see the same examples with the same noise, and DDP's gradient average
of per-rank means equals the global mean.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler

from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.elbo import terms_from_outputs
from vae_pipeline.model import ConvVAE
from vae_pipeline.train import checkpoint
from vae_pipeline.train.distributed import DistEnv, all_reduce_sum, barrier

log = logging.getLogger(__name__)

EpochCallback = Callable[[dict], None]


class TrainingError(RuntimeError):
    """Training cannot go on (bad batch size, non-finite loss, incompatible checkpoint)."""


class _ElboPath(torch.nn.Module):
    """DDP hooks `forward`; this routes it to the per-example ELBO terms the loss needs (so
    every parameter, the Gaussian decoder's log sigma included, is used inside forward)."""

    def __init__(self, vae: ConvVAE):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        return terms_from_outputs(*self.vae.forward_logits(x, eps), x, self.vae.log_likelihood)


def resume_fingerprint(cfg: Config) -> dict:
    """Settings a checkpoint must share with the run that resumes it (epochs may grow)."""
    return {
        "data": cfg.data.model_dump(mode="json"),
        "model": cfg.model.model_dump(mode="json"),
        "train": cfg.train.model_dump(mode="json", include={"batch_size", "lr", "seed"}),
    }


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
        self.out_dir = Path(out_dir)
        self.callbacks = callbacks
        tc = cfg.train
        if tc.batch_size % env.world_size:
            raise TrainingError(
                f"train.batch_size={tc.batch_size} must be divisible by the world size "
                f"{env.world_size} (nnodes x nproc_per_node)"
            )
        self.local_batch = tc.batch_size // env.world_size
        prepared = workdir / cfg.data.prepared_dir
        self.train_set = PreparedSplit(prepared, "train")
        self.val_set = PreparedSplit(prepared, "val")
        self.data_version = self.train_set.manifest.get("data_version", "unversioned")
        if len(self.train_set) < tc.batch_size:
            raise TrainingError(
                f"training split has {len(self.train_set)} images, fewer than "
                f"train.batch_size={tc.batch_size}: lower the batch size or add data"
            )

        torch.manual_seed(tc.seed)  # identical initial weights on every rank
        self.model = ConvVAE(
            cfg.data.channels, cfg.data.image_size, cfg.model.latent_dim, cfg.model.likelihood
        )
        self.model.to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=tc.lr)
        wrapped = _ElboPath(self.model)
        self.net = (
            DDP(wrapped, device_ids=[device.index] if device.type == "cuda" else None)
            if env.distributed
            else wrapped
        )
        self.sampler = DistributedSampler(
            self.train_set,
            num_replicas=env.world_size,
            rank=env.rank,
            shuffle=True,
            seed=tc.seed,
            drop_last=True,
        )
        self.loader = DataLoader(
            self.train_set,
            batch_size=self.local_batch,
            sampler=self.sampler,
            drop_last=True,
            num_workers=tc.num_workers,
            pin_memory=device.type == "cuda",
            persistent_workers=tc.num_workers > 0,
        )
        self.epoch = 0
        self.bad_steps = 0  # skipped non-finite steps so far (train.max_bad_steps)
        self.history: list[dict] = []

    # --- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / "checkpoint.pt"

    def _save_checkpoint(self) -> None:
        if not self.env.is_main:
            return
        if not all(torch.isfinite(p).all() for p in self.model.parameters()):
            raise TrainingError(
                f"non-finite weights after epoch {self.epoch}; no checkpoint written (the last "
                "one is intact): lower train.lr"
            )
        checkpoint.atomic_save(
            {
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.epoch,
                "history": self.history,
                "fingerprint": resume_fingerprint(self.cfg),
                "data_version": self.data_version,
            },
            self.checkpoint_path,
        )

    def _load_checkpoint(self) -> bool:
        if not self.checkpoint_path.is_file():
            return False
        state = checkpoint.load(self.checkpoint_path)
        if state["fingerprint"] != resume_fingerprint(self.cfg):
            raise TrainingError(
                f"checkpoint {self.checkpoint_path} was made with other data/model/train params; "
                "delete it or train into another out dir (--out-dir)"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.history = state["epoch"], state["history"]
        log.info("resumed from %s after epoch %d", self.checkpoint_path, self.epoch)
        return True

    # --- one step, one epoch ---------------------------------------------------------------
    def _epoch_noise(self, epoch: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.cfg.train.seed * 1_000_003 + epoch)

    def _run_batch(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step; returns the per-example sums (on the device) and whether the
        loss and gradients were finite (a device bool: no host sync here)."""
        terms = self.net(x, eps)
        loss = -terms["elbo"].mean()  # nats per example
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        # DDP has averaged the gradients: a NaN on any rank is a NaN on every rank.
        finite = torch.isfinite(loss.detach()) & torch.isfinite(
            torch.nn.utils.get_total_norm(grads)
        )
        if self.cfg.train.max_bad_steps > 0:
            # Skip mode decides before stepping: one host sync per step, by choice.
            bad = all_reduce_sum((~finite).to(torch.float64).reshape(1))
            if bad.item() > 0:  # on any rank: every rank skips, so weights stay in sync
                self.optimizer.zero_grad(set_to_none=True)
                return torch.zeros(3, dtype=torch.float64, device=x.device), bad[0] == 0
        self.optimizer.step()
        # Per-example sums stay on the device: no host sync until a logging point.
        sums = torch.stack([-terms["elbo"].sum(), terms["recon"].sum(), terms["kl"].sum()])
        return sums.detach(), finite

    def _batch_indices(self, step: int) -> list[int]:
        """The training-set indices this rank drew at `step` of the current epoch."""
        local = self.local_batch
        return list(self.sampler)[step * local : (step + 1) * local]

    def _non_finite(self, epoch: int, step: int, what: str) -> TrainingError:
        batch = self._batch_indices(step)
        shown = ", ".join(map(str, batch[:8])) + (", ..." if len(batch) > 8 else "")
        last = f"epoch {self.epoch}" if self.epoch else "none yet"
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
        self.sampler.set_epoch(epoch)
        noise = self._epoch_noise(epoch)
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        seen, skipped, t0 = 0, 0, time.perf_counter()
        steps = len(self.loader)
        skip_mode = self.cfg.train.max_bad_steps > 0
        first_bad = torch.tensor(-1, device=self.device)  # this rank's first non-finite step
        for step, (images, _) in enumerate(self.loader):
            x = to_unit_float(images.to(self.device, non_blocking=True))
            eps = torch.randn(self.cfg.train.batch_size, self.cfg.model.latent_dim, generator=noise)
            eps = eps[self.env.rank :: self.env.world_size].to(self.device)
            batch_sums, finite = self._run_batch(x, eps)
            if skip_mode:
                if not bool(finite):  # synced in _run_batch already
                    skipped += 1
                    self.bad_steps += 1
                    log.warning(
                        "%s", self._non_finite(epoch, step, "skipped a non-finite step").args[0]
                    )
                    if self.bad_steps > self.cfg.train.max_bad_steps:
                        raise self._non_finite(
                            epoch,
                            step,
                            f"more than train.max_bad_steps={self.cfg.train.max_bad_steps} "
                            "non-finite steps; the last",
                        )
                    continue
            else:
                first_bad = torch.where(
                    (~finite) & (first_bad < 0), torch.tensor(step, device=self.device), first_bad
                )
            sums += batch_sums
            seen += x.shape[0]
            if (step + 1) % self.cfg.train.log_every == 0 and not skip_mode:
                self._check_finite(epoch, first_bad)
            if self.env.is_main and (step + 1) % self.cfg.train.log_every == 0:
                rate = seen * self.env.world_size / (time.perf_counter() - t0)
                # .item() is a host sync: only at logging points
                log.info(
                    "epoch %d step %d/%d  -elbo %.2f  %.0f img/s",
                    epoch + 1,
                    step + 1,
                    steps,
                    sums[0].item() / seen,
                    rate,
                )
        if not skip_mode:
            self._check_finite(epoch, first_bad)
        counts = torch.tensor([float(seen)], dtype=torch.float64, device=self.device)
        all_reduce_sum(sums)
        all_reduce_sum(counts)
        seconds = time.perf_counter() - t0
        n = counts.item()
        if n == 0:
            raise TrainingError(
                f"every step of epoch {epoch + 1} was non-finite and skipped; no checkpoint "
                "written: lower train.lr or check the data"
            )
        loss, recon, kl = (sums / n).tolist()
        return {
            "train_loss": loss,
            "train_recon": recon,
            "train_kl": kl,
            "skipped_steps": skipped,
            "images_per_s": n / seconds,
            "epoch_seconds": seconds,
        }

    @torch.no_grad()
    def _validate(self) -> dict:
        """Negative ELBO on the validation split, sharded rank::world and summed across ranks."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        # Noise per validation image, not per rank: the same numbers for any world size.
        gen = torch.Generator().manual_seed(self.cfg.train.seed + 7)
        noise = torch.randn(len(self.val_set), self.cfg.model.latent_dim, generator=gen)
        idx = torch.arange(self.env.rank, len(self.val_set), self.env.world_size)
        for start in range(0, len(idx), 1024):
            rows = idx[start : start + 1024]
            x = to_unit_float(torch.from_numpy(self.val_set.images[rows.numpy()]).to(self.device))
            eps = noise[rows].to(self.device)
            terms = _ElboPath(self.model)(x, eps)
            sums += torch.stack([-terms["elbo"].sum(), terms["recon"].sum(), terms["kl"].sum()])
        count = torch.tensor([float(len(idx))], dtype=torch.float64, device=self.device)
        all_reduce_sum(sums)
        all_reduce_sum(count)
        if count.item() == 0:
            return {}
        loss, recon, kl = (sums / count.item()).tolist()
        return {"val_loss": loss, "val_recon": recon, "val_kl": kl}

    # --- the loop --------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train to `train.epochs`, resuming from `checkpoint.pt` in the out dir if present."""
        self._load_checkpoint()
        total = self.cfg.train.epochs
        if self.env.is_main:
            log.info(
                "training %d -> %d epochs on %s, world size %d, %d images/epoch",
                self.epoch,
                total,
                self.device,
                self.env.world_size,
                len(self.loader) * self.cfg.train.batch_size,
            )
        while self.epoch < total:
            record = {"epoch": self.epoch + 1, **self._run_epoch(self.epoch), **self._validate()}
            if not all(math.isfinite(v) for v in record.values()):
                raise TrainingError(
                    f"non-finite loss in epoch {record['epoch']} ({record}); no checkpoint written: "
                    "lower train.lr"
                )
            self.epoch += 1
            self.history.append(record)
            self._save_checkpoint()
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
                    callback(record)
        self._write_outputs()
        barrier()
        return self.history

    def _write_outputs(self) -> None:
        if not self.env.is_main:
            return
        checkpoint.save_model(
            self.model.cpu(),
            self.out_dir / "model.pt",
            data_version=self.data_version,
            params_hash=self.cfg.params_hash(),
            epochs=self.epoch,
        )
        self.model.to(self.device)
        (self.out_dir / "history.json").write_text(json.dumps(self.history, indent=2))
