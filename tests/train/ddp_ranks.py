"""Run under torchrun by test_ddp.py: train with the real Trainer, then gather every rank's
weights so the test can compare them (in normal runs only rank 0 writes files).

An optional 4th argument RANK:STEP makes that rank's input NaN at that (1-based) training step;
each rank then writes the error it stopped with to error_rank<r>.txt and exits 1."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vae_pipeline.config import load_config
from vae_pipeline.train import Trainer, TrainingError, distributed


def main(config: str, out_dir: str, workdir: str, poison: str = "") -> None:
    cfg = load_config(config)
    env, device = distributed.setup("cpu")
    trainer = Trainer(cfg, Path(out_dir), env, device, workdir=Path(workdir))
    if poison:
        rank, step = map(int, poison.split(":"))
        seen = {"n": 0}

        def hook(module, args):
            if not module.training:
                return None
            seen["n"] += 1
            return (args[0] * float("nan"),) if seen["n"] == step else None

        if env.rank == rank:
            trainer.model.encoder.register_forward_pre_hook(hook)
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
    if env.is_main:
        torch.save(torch.stack(gathered), Path(out_dir) / "rank_weights.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
