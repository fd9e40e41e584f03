"""The validation pass of each epoch: the negative ELBO on the validation split, the same
numbers for any world size (noise per image, shards rank::world, sums across ranks)."""

from __future__ import annotations

import torch

from vae_pipeline.binarize import VALIDATION_STREAM, binarize
from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.data import DeviceSplit
from vae_pipeline.train.distributed import DistEnv, all_reduce_sum
from vae_pipeline.train.step import ElboPath


@torch.no_grad()
def validate(
    model: ConvVAE,
    cfg: Config,
    env: DistEnv,
    device: torch.device,
    val_set: PreparedSplit,
    val_data: DeviceSplit | None,
) -> dict:
    """Negative ELBO on the validation split, sharded rank::world and summed across ranks
    (`val_data`: the split resident on the device, else read from `val_set`)."""
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    # Noise per validation image, not per rank: the same numbers for any world size.
    gen = torch.Generator().manual_seed(cfg.train.seed + 7)
    noise = torch.randn(len(val_set), cfg.model.latent_dim, generator=gen)
    idx = torch.arange(env.rank, len(val_set), env.world_size)
    tc = cfg.train
    for start in range(0, len(idx), 1024):
        rows = idx[start : start + 1024]
        if val_data is not None:
            x = to_unit_float(val_data.batch(rows))
        else:
            x = to_unit_float(val_set.take(rows.numpy()).to(device))
        x = binarize(x, tc.binarize, tc.seed, VALIDATION_STREAM, rows.to(device))
        eps = noise[rows].to(device)
        terms = ElboPath(model)(x, eps)
        sums += torch.stack([-terms["elbo"].sum(), terms["recon"].sum(), terms["kl"].sum()])
    count = torch.tensor([float(len(idx))], dtype=torch.float64, device=device)
    all_reduce_sum(sums)
    all_reduce_sum(count)
    if count.item() == 0:
        return {}
    loss, recon, kl = (sums / count.item()).tolist()
    return {"val_loss": loss, "val_recon": recon, "val_kl": kl}
