"""What `registry.log_checkpoints` costs: one epoch's checkpoint logged as an MLflow logged model
(tracking.CheckpointModels, SQLite store) against the time of a `make run` epoch on this CPU.

    python bench/checkpoint_models.py [--images 4096] [--repeats 5]

The epoch is measured on `--images` training images of the demo config (params.yaml, fp32)
and scaled to the full training split `make run` trains on; the checkpoint is timed at the
demo's size and at the seed's (3x250x250, latent 128: 53.6M parameters)."""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import yaml

from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.model import ConvVAE
from vae_pipeline.tracking import CheckpointModels, EpochLogger, start_run
from vae_pipeline.train.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]


def _params(limit: int | None = None, **train) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update({"nproc_per_node": 1, "precision": "fp32", **train})
    params["data"]["limit"] = limit
    return params


def checkpoint_seconds(uri: str, run_id: str, model: ConvVAE, repeats: int) -> float:
    log = CheckpointModels(uri, run_id)
    times = []
    for epoch in range(1, repeats + 1):
        t0 = time.perf_counter()
        log({"epoch": epoch}, model)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:] if repeats > 1 else times)  # the first pays imports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-ckpt-"))
    uri = f"sqlite:///{root}/mlflow.db"

    full = build_config(_params())
    snapshot_source(full, root)
    train_images = prepare(full, root)["counts"]["train"]
    cfg = build_config(_params(args.images, epochs=1, channels_last=False))
    work = root / "limited"
    work.mkdir()
    snapshot_source(cfg, work)
    limited = prepare(cfg, work)["counts"]["train"]
    run_id = start_run(cfg, uri, root, "bench", {"git_commit": "unknown"})
    trainer = Trainer(cfg, root / "run", workdir=work, callbacks=(EpochLogger(uri, run_id),))
    seconds = trainer.fit()[0]["epoch_seconds"]
    epoch = seconds * train_images / limited
    demo = checkpoint_seconds(uri, run_id, trainer.model.cpu(), args.repeats)
    seed = checkpoint_seconds(uri, run_id, ConvVAE(3, 250, 128), max(2, args.repeats // 2))
    print(
        json.dumps(
            {
                "make_run_epoch_s": round(epoch, 1),
                "train_images": train_images,
                "checkpoint_demo_s": round(demo, 2),
                "checkpoint_demo_share_of_epoch": round(demo / epoch, 4),
                "checkpoint_seed_s": round(seed, 2),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
