"""One training rank. torchrun runs this module (so can an external torchrun or a PyTorchJob):

    torchrun --nproc_per_node=2 -m vae_pipeline.worker --params params.yaml --out-dir models

Rank 0 alone writes files and, given --mlflow-run-id, logs per-epoch metrics to that run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vae_pipeline.cli.parser import add_error_dir_argument, add_params_arguments, report_error
from vae_pipeline.config import ConfigError, load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.errors import PipelineError
from vae_pipeline.logs import setup_logging
from vae_pipeline.signals import die_with_parent
from vae_pipeline.train import distributed
from vae_pipeline.train.trainer import Trainer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vae_pipeline.worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_arguments(p)
    p.add_argument("--out-dir", type=Path, default=None, help="default: train.out_dir")
    p.add_argument("--mlflow-run-id", default=None, help="MLflow run to log epochs into")
    add_error_dir_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent()  # a rank never outlives its torchrun agent
    setup_logging()
    try:
        cfg = load_config(args.params, args.overrides)
    except ConfigError as exc:
        report_error(exc, args.error_dir, distributed.read_env().rank)
        return 2
    env = distributed.read_env()
    try:
        env, device = distributed.setup(cfg.train.device)
        callbacks = ()
        if env.is_main and args.mlflow_run_id:
            from vae_pipeline.tracking import CheckpointModels, EpochLogger

            uri = tracking_uri(cfg)
            callbacks = (EpochLogger(uri, args.mlflow_run_id),)
            if cfg.registry.log_checkpoints:  # each epoch a logged model
                callbacks += (CheckpointModels(uri, args.mlflow_run_id),)
        trainer = Trainer(
            cfg, args.out_dir or Path(cfg.train.out_dir), env, device, callbacks=callbacks
        )
        trainer.fit()
    except PipelineError as exc:
        report_error(exc, args.error_dir, env.rank)
        return 1
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
