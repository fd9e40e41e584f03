"""Data: snapshot a source into the raw area, prepare uint8 splits, read them memory-mapped.

Names are imported on first use (PEP 562), so the decode worker processes, which need only
`vae_pipeline.data.images` (Pillow and NumPy), start without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "DataError": "vae_pipeline.data.errors",
    "PreparedSplit": "vae_pipeline.data.dataset",
    "read_manifest": "vae_pipeline.data.dataset",
    "prepare": "vae_pipeline.data.preparation",
    "snapshot_source": "vae_pipeline.data.sources",
}

if TYPE_CHECKING:
    from vae_pipeline.data.dataset import PreparedSplit, read_manifest
    from vae_pipeline.data.errors import DataError
    from vae_pipeline.data.preparation import prepare
    from vae_pipeline.data.sources import snapshot_source

__all__ = ["DataError", "PreparedSplit", "prepare", "read_manifest", "snapshot_source"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
