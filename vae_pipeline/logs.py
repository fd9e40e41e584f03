"""Logging set up once, with a fixed prefix (and the rank, under torchrun)."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(level: int = logging.INFO) -> None:
    rank = os.environ.get("RANK")
    prefix = f"[vae-pipeline rank{rank}]" if rank is not None else "[vae-pipeline]"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{prefix} %(asctime)s %(message)s", "%H:%M:%S"))
    root = logging.getLogger("vae_pipeline")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
