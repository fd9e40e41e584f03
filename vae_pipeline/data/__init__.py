"""Data: snapshot a source into the raw area, prepare uint8 splits, read them memory-mapped."""

from vae_pipeline.data.dataset import PreparedSplit, read_manifest
from vae_pipeline.data.errors import DataError
from vae_pipeline.data.prepare import prepare
from vae_pipeline.data.sources import snapshot_source

__all__ = ["DataError", "PreparedSplit", "prepare", "read_manifest", "snapshot_source"]
