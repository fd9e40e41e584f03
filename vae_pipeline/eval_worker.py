"""One evaluation rank. `vae-pipeline evaluate` runs this under torchrun when
evaluate.nproc_per_node > 1 (so can an external torchrun):

    torchrun --nproc_per_node=4 -m vae_pipeline.eval_worker --params params.yaml --model models

Each rank evaluates a contiguous shard of the test split with the examples' own RNG streams, so
the per-example values, and the metrics, are those of one process. Rank 0 writes the reports.
"""

from __future__ import annotations

import argparse
import sys

from vae_pipeline.cli.parser import add_error_dir_argument, add_params_arguments, report_error
from vae_pipeline.config import ConfigError, load_config
from vae_pipeline.config.environment import apply_quiet_offline_defaults
from vae_pipeline.errors import PipelineError
from vae_pipeline.logs import setup_logging
from vae_pipeline.signals import die_with_parent
from vae_pipeline.train import distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m vae_pipeline.eval_worker",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_params_arguments(p)
    p.add_argument(
        "--model",
        required=True,
        help="model.pt file, a train out dir, or an MLflow URI (models:/conv-vae@champion)",
    )
    add_error_dir_argument(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    die_with_parent()  # a rank never outlives its torchrun agent
    setup_logging()
    apply_quiet_offline_defaults()
    try:
        cfg = load_config(args.params, args.overrides)
    except ConfigError as exc:
        report_error(exc, args.error_dir, distributed.read_env().rank)
        return 2
    from vae_pipeline import pipeline

    env = distributed.read_env()
    try:
        env, device = distributed.setup(cfg.train.device)
        pipeline.evaluate_model(cfg, args.model, device=device)
    except PipelineError as exc:
        report_error(exc, args.error_dir, env.rank)
        return 1
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
