"""The drift monitor's checks on the cases operators meet, and its false-alarm rate.

    python bench/drift_monitor.py                    # 6,000 training images, 3 epochs, CPU
    python bench/drift_monitor.py --images 8000 --epochs 10 --trials 100

Trains a champion on Fashion-MNIST (the Trainer, the demo's model), scores its test split as
evaluation stores it (the likelihood check's reference), then runs `drift_decision` on --n new
images of each case: Fashion-MNIST test images it never saw, through the IDX path and as
28x28 PNG files in a folder (the one fitting rule: the same tensors), the same images scaled
to 32 (the folder rule before the fix), drawn digits, and inverted clothing. Then the
false-alarm rate: --trials random in-distribution samples per size, at monitor.confidence.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo: tests.drift_images

from tests.drift_images import drawn_digits, fashion_test_images, save_pngs  # noqa: E402
from vae_pipeline.config import build_config
from vae_pipeline.data.images import list_images, resize_and_crop
from vae_pipeline.data.preparation import fit_fashion_mnist, prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.monitor.check import load_images, score
from vae_pipeline.monitor.drift import drift_decision
from vae_pipeline.train.checkpoint import load_model
from vae_pipeline.train.trainer import Trainer


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--images",
        type=int,
        default=6000,
        help="data.limit: training images, and test images in the reference (the other "
        "test images are the new ones, so keep it under 10,000 - --n)",
    )
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n", type=int, default=500, help="new images per case")
    ap.add_argument("--trials", type=int, default=40, help="in-distribution samples per size")
    ap.add_argument("--sizes", default="10,30,100,300,1000")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ws = Path(tempfile.mkdtemp(prefix="drift-bench-"))
    cfg = build_config(
        {
            "data": {"limit": args.images},
            "train": {"epochs": args.epochs, "nproc_per_node": 1, "log_every": 10**6},
        }
    )
    t0 = time.perf_counter()
    snapshot_source(cfg, ws)
    prepare(cfg, ws)
    Trainer(cfg, ws / "models", workdir=ws).fit()
    model, _ = load_model(ws / "models" / "model.pt")
    print(f"champion: {args.images} images, {args.epochs} epochs, {time.perf_counter() - t0:.0f} s")

    test = torch.from_numpy(np.load(ws / "data/prepared/test_images.npy"))
    reference, _ = score(cfg, model, test, "none", cfg.evaluate.seed)
    n_ref = min(cfg.monitor.max_images, len(test))
    ref_rows = np.sort(np.random.default_rng(0).choice(len(test), n_ref, replace=False))
    _, ref_mu = score(cfg, model, test[ref_rows], "none", 1)
    used = len(test)  # prepare took test images 0..used-1: new ones start after
    fresh = fashion_test_images(used, 10000 - used)
    if len(fresh) < max(args.n, *(int(s) for s in args.sizes.split(","))):
        raise SystemExit(f"only {len(fresh)} unseen test images: lower --images, --n or --sizes")

    def run(images: torch.Tensor):
        scores, mu = score(cfg, model, images, "none", 0)
        return drift_decision(scores, reference, cfg.monitor, False, mu, ref_mu)

    n = args.n
    idx_path = torch.from_numpy(fit_fashion_mnist(torch.from_numpy(fresh[:n]), 32, 1))
    folder = save_pngs(fresh[:n], ws / "folder28")
    _, folder_path = load_images(cfg, folder, list_images(folder), n, 0)
    assert torch.equal(idx_path, folder_path), "the folder and IDX paths differ"
    resized = torch.from_numpy(
        np.stack([resize_and_crop(Image.fromarray(a), 32) for a in fresh[:n]])
    )
    digits = torch.from_numpy(fit_fashion_mnist(torch.from_numpy(drawn_digits(n, 0)), 32, 1))
    inverted = torch.from_numpy(fit_fashion_mnist(torch.from_numpy(255 - fresh[:n]), 32, 1))
    cases = [
        ("Fashion-MNIST test images it never saw (IDX path, padded)", idx_path, "no drift"),
        ("the same images as 28x28 PNGs in a folder (same tensors now)", folder_path, "no drift"),
        ("the same images scaled to 32x32 (the old folder rule)", resized, "(preprocessing)"),
        ("drawn digits, 28x28", digits, "drift"),
        ("inverted Fashion-MNIST", inverted, "drift"),
    ]
    print(
        f"\n{date.today()}, {platform.node() or 'this machine'}, torch {torch.__version__}, "
        f"confidence {cfg.monitor.confidence}, threshold {cfg.monitor.threshold_nats} nats, "
        f"{n} new images vs {len(reference)} (likelihood) / {n_ref} (latent) test images\n"
    )
    print("| new images | shift (nats), interval | MMD^2, p | verdict | right answer |")
    print("|---|---|---|---|---|")
    for name, images, right in cases:
        d = run(images)
        print(
            f"| {name} | {d.shift:+.2f} [{d.lower_bound:+.2f}, {d.upper_bound:+.2f}] | "
            f"{d.mmd2:.4f}, {d.mmd_p:.3f} | {'drift' if d.drift else 'no drift'} | {right} |"
        )

    print(
        f"\nfalse alarms on in-distribution samples ({args.trials} per size; allowed "
        f"{1 - cfg.monitor.confidence:.0%}):\n"
    )
    print("| new images | alarms | likelihood fired | latent fired | rate |")
    print("|---|---|---|---|---|")
    pool = torch.from_numpy(fit_fashion_mnist(torch.from_numpy(fresh), 32, 1))
    rng = np.random.default_rng(1)
    for size in [int(s) for s in args.sizes.split(",")]:
        alarms = lik = lat = 0
        for _ in range(args.trials):
            rows = rng.choice(len(pool), size, replace=False)
            d = run(pool[rows])
            alarms += d.drift
            lik += d.checks[0]["fired"]
            lat += d.checks[1]["fired"]
        print(f"| {size} | {alarms}/{args.trials} | {lik} | {lat} | {alarms / args.trials:.1%} |")


if __name__ == "__main__":
    main()
