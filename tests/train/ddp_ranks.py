"""Run under torchrun by test_ddp.py: train with the real Trainer, then gather every rank's
weights so the test can compare them (in normal runs only rank 0 writes files).

An optional 4th argument injects a fault at a (1-based) training step on one rank:
- `nan:RANK:STEP` makes that rank's input NaN; each rank then writes the error it stopped with
  to error_rank<r>.txt and exits 1;
- `kill:RANK:STEP` SIGKILLs that rank in its first attempt (torchrun's restart count 0), as a
  lost worker would die; torchrun (--max-restarts) restarts every rank, and they resume from the
  last checkpoint."""

import json
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vae_pipeline.config import load_config
from vae_pipeline.logs import setup_logging
from vae_pipeline.train import distributed
from vae_pipeline.train.step import TrainingError
from vae_pipeline.train.trainer import Trainer


def _at_step(trainer: Trainer, step: int, action) -> None:
    seen = {"n": 0}

    def hook(module, args):
        if not module.training:
            return None
        seen["n"] += 1
        return action(args) if seen["n"] == step else None

    trainer.model.encoder.register_forward_pre_hook(hook)


def main(config: str, out_dir: str, workdir: str, fault: str = "") -> None:
    setup_logging()
    cfg = load_config(config)
    env, device = distributed.setup("cpu")
    trainer = Trainer(cfg, Path(out_dir), env, device, workdir=Path(workdir))
    kind, rank, step = fault.split(":") if fault else ("", "-1", "0")
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if kind == "kill" and env.rank == int(rank) and first_attempt:
        _at_step(trainer, int(step), lambda args: os.kill(os.getpid(), signal.SIGKILL))
    if kind == "nan":
        if env.rank == int(rank):
            _at_step(trainer, int(step), lambda args: (args[0] * float("nan"),))
        try:
            trainer.fit()
        except TrainingError as exc:
            (Path(out_dir) / f"error_rank{env.rank}.txt").write_text(str(exc))
            distributed.teardown()
            sys.exit(1)
    else:
        trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(env.world_size)]
    dist.all_gather(gathered, flat)
    ignored = [None] * env.world_size  # what DDP leaves rank-local on each rank
    dist.all_gather_object(ignored, sorted(trainer.ddp.parameters_to_ignore))
    if env.is_main:
        torch.save(torch.stack(gathered), Path(out_dir) / "rank_weights.pt")
        by_rank = {str(rank): names for rank, names in enumerate(ignored)}
        (Path(out_dir) / "ddp_ignored.json").write_text(json.dumps(by_rank))
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
