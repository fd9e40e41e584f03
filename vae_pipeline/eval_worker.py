"""One evaluation rank. `vae-pipeline evaluate` runs this under torchrun when
evaluate.nproc_per_node > 1 (so can an external torchrun):

    torchrun --nproc_per_node=4 -m vae_pipeline.eval_worker --params params.yaml --model models

Each rank evaluates a contiguous shard of the test split with the examples' own RNG streams, so
the per-example values, and the metrics, are those of one process. Rank 0 writes the reports.

A rank needs torch and the evaluation's own libraries, not MLflow, Prefect, DVC or boto3 (a GPU
host may have none of them): `vae-pipeline evaluate` downloads an MLflow URI before it starts the
ranks and hands them the local file. Given a URI itself, a rank downloads it (MLflow needed).
"""

from __future__ import annotations

import argparse
import sys

from vae_pipeline.cli.parser import add_error_dir_argument, add_params_arguments, report_error
from vae_pipeline.config import Config, ConfigError, load_config
from vae_pipeline.config.environment import apply_quiet_offline_defaults
from vae_pipeline.errors import PipelineError, UserError
from vae_pipeline.evaluate.model_file import evaluate_model_file, is_tracking_uri
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
        help="model.pt file, a train out dir, or an MLflow URI (models:/conv-vae@champion; "
        "each rank downloads it, which needs MLflow on this host)",
    )
    add_error_dir_argument(p)
    return p.parse_args(argv)


def downloaded(cfg: Config, uri: str) -> str:
    """The local weights file of an MLflow URI given to a rank directly (not through
    `vae-pipeline evaluate`, which downloads it first); only this path needs MLflow."""
    try:
        from vae_pipeline.pipeline import model_weights
    except ImportError as exc:
        raise UserError(
            f"--model {uri}: an MLflow URI needs MLflow on every rank, and this host cannot "
            f"import it ({exc}); download the model first (a model.pt file or a train out "
            "dir), or run `vae-pipeline evaluate`, which downloads it before it starts the ranks"
        ) from None
    return str(model_weights(cfg, uri))


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
    env = distributed.read_env()
    try:
        env, device = distributed.setup(cfg.train.device)
        model = downloaded(cfg, args.model) if is_tracking_uri(args.model) else args.model
        evaluate_model_file(cfg, model, device=device, name=args.model)
    except PipelineError as exc:
        report_error(exc, args.error_dir, env.rank)
        return 1
    finally:
        distributed.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
