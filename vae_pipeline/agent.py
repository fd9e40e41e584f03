"""torchrun's agent, as the launcher runs it: torchrun itself, with its own log in a file.

    python -m vae_pipeline.agent --log models/torchrun.log -- <torchrun arguments>

The ranks' output reaches the terminal as under plain torchrun. What the agent says itself
(its warnings, restarts, and when a rank fails the `ChildFailedError` traceback with its
FAILED / Root Cause block) goes to the log file instead, so a rank's clean error (a damaged
checkpoint, a bad setting) reaches the user as the one line the launcher prints, naming this
file; a rank that really crashed still prints its own traceback. The exit code is torchrun's:
0 when every rank finished, 1 when one failed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m vae_pipeline.agent",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--log", type=Path, required=True, help="the agent's log file (appended)")
    p.add_argument("torchrun_args", nargs=argparse.REMAINDER, help="-- then torchrun's arguments")
    args = p.parse_args(argv)
    rest = args.torchrun_args[1:] if args.torchrun_args[:1] == ["--"] else args.torchrun_args
    return args, rest


def main(argv: list[str] | None = None) -> int:
    args, torchrun_args = parse_args(argv)
    args.log.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(args.log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.captureWarnings(True)
    from torch.distributed import run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        run.main(torchrun_args)
    except ChildFailedError as exc:
        logging.getLogger("vae_pipeline.agent").error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
