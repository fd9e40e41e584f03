"""`vae-pipeline`: thin subcommands over vae_pipeline.pipeline.

Every subcommand reads params.yaml (--params), takes `--set section.key=value` overrides and
rejects an invalid value, naming the field, before doing any work.
"""

from __future__ import annotations

import logging
import sys

from vae_pipeline.cli.model_commands import cmd_encode, cmd_interpolate, cmd_sample, cmd_score
from vae_pipeline.cli.parser import build_parser, topology_overrides
from vae_pipeline.cli.pipeline_commands import (
    cmd_deploy,
    cmd_evaluate,
    cmd_ingest,
    cmd_monitor,
    cmd_prepare,
    cmd_retrain,
    cmd_train,
)
from vae_pipeline.cli.registry_commands import (
    cmd_history,
    cmd_lineage,
    cmd_promote,
    cmd_register,
    cmd_rollback,
)
from vae_pipeline.config import ConfigError, load_config
from vae_pipeline.config.environment import apply_quiet_offline_defaults
from vae_pipeline.errors import is_reported
from vae_pipeline.logs import setup_logging
from vae_pipeline.signals import exit_on_sigterm

log = logging.getLogger(__name__)

__all__ = ["entry", "main"]


COMMANDS = {
    "ingest": cmd_ingest,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "register": cmd_register,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "history": cmd_history,
    "lineage": cmd_lineage,
    "retrain": cmd_retrain,
    "monitor": cmd_monitor,
    "deploy": cmd_deploy,
    "sample": cmd_sample,
    "interpolate": cmd_interpolate,
    "encode": cmd_encode,
    "score": cmd_score,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    apply_quiet_offline_defaults()
    try:
        cfg = load_config(args.params, [*args.overrides, *topology_overrides(args)])
    except ConfigError as exc:
        print(f"vae-pipeline {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the cleanup has run on the way out
        print(f"vae-pipeline {args.command}: stopped ({exc or 'interrupted'})", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_reported(exc):  # a bug, or a library's own failure: its traceback
            raise
        print(f"vae-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def entry() -> int:
    """The `vae-pipeline` command: `main` with SIGTERM handled like Ctrl-C, so a scheduler's
    or `kill`'s stop leaves no torchrun, rank or Prefect server behind (set here, not in
    `main`, which tests and other programs call in their own process)."""
    exit_on_sigterm()
    return main()
