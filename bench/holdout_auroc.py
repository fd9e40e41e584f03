"""Which Fashion-MNIST class a likelihood score can detect: AUROC of each class held out in turn.

For every class k: train the ConvVAE (1x32x32) on `--images` training images of the other nine
classes for `--epochs` epochs (plain loop, one process, seeded), score the first `--test`
official test images by negative ELBO and by the IW bound, and report the AUROC of class k
against the rest. Prints a Markdown table (docs/benchmarks.md has a run). Likelihood scores
favour simple images (few lit pixels), so sparse classes held out score *below* chance.

    python bench/holdout_auroc.py --images 2000 --epochs 3
"""

from __future__ import annotations

import argparse
import gzip
import time
from pathlib import Path

import numpy as np
import torch

from vae_pipeline.elbo import elbo_terms, iw_log_likelihood
from vae_pipeline.evaluate import downstream
from vae_pipeline.model import ConvVAE

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip


def _load(folder: Path, prefix: str) -> tuple[torch.Tensor, np.ndarray]:
    with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz") as fh:
        x = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        y = np.frombuffer(fh.read(), np.uint8, offset=8)
    x = np.pad(x, ((0, 0), (2, 2), (2, 2)))[:, None]  # 28 -> 32, as prepare does
    return torch.from_numpy(x).float() / 255.0, y


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=FASHION_MNIST, help="Fashion-MNIST IDX folder")
    p.add_argument("--images", type=int, default=2000, help="training images (default 2000)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--latent-dim", type=int, default=8)
    p.add_argument("--test", type=int, default=1000, help="test images scored (default 1000)")
    p.add_argument("--k", type=int, default=16, help="IW samples (default 16)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    x_train, y_train = _load(args.data, "train")
    x_test, y_test = _load(args.data, "t10k")
    x_test, y_test = x_test[: args.test], y_test[: args.test]
    print(
        f"{args.images} training images, {args.epochs} epochs, latent {args.latent_dim}, "
        f"{args.test} test images, K={args.k}\n"
    )
    print("| held-out class | AUROC (neg. ELBO) | AUROC (IW, K) | mean lit pixels | seconds |")
    print("|---|---|---|---|---|")
    for k in range(10):
        start = time.perf_counter()
        torch.manual_seed(0)
        keep = np.flatnonzero(y_train != k)[: args.images]
        model = ConvVAE(1, 32, args.latent_dim)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(args.epochs):
            order = torch.randperm(len(keep))
            for s in range(0, len(keep) - 63, 64):
                loss = -elbo_terms(model, x_train[keep[order[s : s + 64]]])["elbo"].mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            neg_elbo = -elbo_terms(model, x_test)["elbo"].numpy()
            iw = -iw_log_likelihood(model, x_test, args.k, args.k).numpy()
        held = y_test == k
        lit = float((x_test[held] > 0.5).float().sum(dim=(1, 2, 3)).mean())
        print(
            f"| {k} {NAMES[k]} | {downstream.auroc_auprc(neg_elbo, held)[0]:.3f} | "
            f"{downstream.auroc_auprc(iw, held)[0]:.3f} | {lit:.0f} | "
            f"{time.perf_counter() - start:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
