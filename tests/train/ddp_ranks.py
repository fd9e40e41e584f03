"""Run under torchrun by test_ddp.py: train with the real Trainer, then gather every rank's
weights so the test can compare them (in normal runs only rank 0 writes files)."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from vae_pipeline.config import load_config
from vae_pipeline.train import Trainer, distributed


def main(config: str, out_dir: str, workdir: str) -> None:
    cfg = load_config(config)
    env, device = distributed.setup("cpu")
    trainer = Trainer(cfg, Path(out_dir), env, device, workdir=Path(workdir))
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(env.world_size)]
    dist.all_gather(gathered, flat)
    if env.is_main:
        torch.save(torch.stack(gathered), Path(out_dir) / "rank_weights.pt")
    distributed.teardown()


if __name__ == "__main__":
    main(*sys.argv[1:])
