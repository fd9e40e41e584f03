"""The benchmark preset's choices, measured on the validation split (never on test).

    python bench/binarized_preset.py                       # Fashion-MNIST, 10,000 images, 3 epochs
    python bench/binarized_preset.py --source idx:/data/mnist --images 60000 --epochs 20 --device cuda

Each variant trains with the Trainer (dynamic binarization, the same seed, data and number of
epochs) and is scored on the first --val-images validation images, dynamically binarized, by
the importance-weighted bound with K = --k: nats over the 784 real pixels (lower is better),
with the weights' effective sample size, the active units and the training time. Variants:
the ELBO and the IWAE objective (K = 8) at latent 32 (the demo's size) and 64, and the IWAE
objective with a cosine schedule, with and without a KL warm-up. Training is deterministic, so
`--only` re-runs a subset with the same numbers for the others.
"""

from __future__ import annotations

import argparse
import logging
import platform
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.evaluate.estimator import per_example_terms
from vae_pipeline.train.trainer import Trainer

VARIANTS = {
    "ELBO, latent 32": {"model": {"latent_dim": 32}, "train": {}},
    "ELBO, latent 64": {"model": {"latent_dim": 64}, "train": {}},
    "IWAE K=8, latent 32": {
        "model": {"latent_dim": 32},
        "train": {"objective": "iwae", "iw_samples": 8},
    },
    "IWAE K=8, latent 64": {
        "model": {"latent_dim": 64},
        "train": {"objective": "iwae", "iw_samples": 8},
    },
    "IWAE K=8, latent 32, cosine": {
        "model": {"latent_dim": 32},
        "train": {"objective": "iwae", "iw_samples": 8, "lr_schedule": "cosine", "lr_min": 1e-5},
    },
    "IWAE K=8, latent 64, cosine + KL warm-up over a third": {
        "model": {"latent_dim": 64},
        "train": {
            "objective": "iwae",
            "iw_samples": 8,
            "lr_schedule": "cosine",
            "lr_min": 1e-5,
            "kl_warmup_steps": "third",
        },
    },
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--source", default="idx:/usr/share/datasets/fashion-mnist")
    p.add_argument("--images", type=int, default=10_000, help="training images (data.limit)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--val-images", type=int, default=1000)
    p.add_argument("--k", type=int, default=100, help="K of the validation IW bound")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--only", nargs="*", default=None, metavar="N", type=int,
        help="run only these variants (0-based positions in the list above)",
    )  # fmt: skip
    args = p.parse_args()
    logging.getLogger("vae_pipeline").setLevel(logging.WARNING)
    device = torch.device(args.device)
    base = {
        "data": {"source": args.source, "limit": args.images},
        "train": {
            "epochs": args.epochs,
            "batch_size": 128,
            "binarize": "dynamic",
            "channels_last": args.device == "cpu",
            "precision": "fp32",
            "log_every": 10**9,
        },
        "evaluate": {"iw_samples": args.k, "iw_chunk": min(args.k, 50), "batch_size": 100},
    }
    where = torch.cuda.get_device_name(device) if args.device == "cuda" else platform.machine()
    print(
        f"# {date.today()}  {where}  torch {torch.__version__}  {torch.get_num_threads()} threads"
    )
    print(
        f"# {args.source}, {args.images} training images, {args.epochs} epochs, batch 128, "
        f"dynamic binarization; validation: {args.val_images} images, K = {args.k}"
    )
    print("| variant | val IW-NLL (nats) | stderr | IW ESS mean | active units | train s |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="vae-preset-") as tmp:
        root = Path(tmp)
        cfg = build_config(base)
        snapshot_source(cfg, root)
        prepare(cfg, root)
        val = PreparedSplit(root / cfg.data.prepared_dir, "val")
        images = val.tensor(0, args.val_images)
        steps = args.epochs * (len(PreparedSplit(root / cfg.data.prepared_dir, "train")) // 128)
        for i, (name, variant) in enumerate(VARIANTS.items()):
            if args.only is not None and i not in args.only:
                continue
            train = {**base["train"], **variant["train"]}
            if train.get("kl_warmup_steps") == "third":
                train["kl_warmup_steps"] = steps // 3
            vcfg = build_config({**base, "model": variant["model"], "train": train})
            t0 = time.perf_counter()
            trainer = Trainer(vcfg, root / name.replace(" ", "_"), workdir=root, device=device)
            trainer.fit()
            seconds = time.perf_counter() - t0
            terms = per_example_terms(trainer.model, images, vcfg.evaluate, device)
            nll = -terms["iw_log_px"]
            active = int((terms["mu"].var(axis=0) > vcfg.evaluate.active_unit_threshold).sum())
            print(
                f"| {name} | {nll.mean():.2f} | {nll.std(ddof=1) / np.sqrt(len(nll)):.2f} | "
                f"{terms['iw_ess'].mean():.1f} | {active}/{vcfg.model.latent_dim} | {seconds:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
