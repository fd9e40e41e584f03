"""Training: one Trainer that is a single process or one torchrun rank, plus its launcher.

The names below are imported on first use (PEP 562, as in `vae_pipeline.data`), so a module
that needs one part (the device choice, the checkpoint files) does not import the trainer.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Trainer": "vae_pipeline.train.trainer",
    "TrainingError": "vae_pipeline.train.step",
    "load_model": "vae_pipeline.train.checkpoint",
    "save_model": "vae_pipeline.train.checkpoint",
}

__all__ = ["Trainer", "TrainingError", "load_model", "save_model"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
