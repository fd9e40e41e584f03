"""Fixtures for the data tests."""

import pytest


@pytest.fixture
def pools(monkeypatch):
    """Worker pools from 16 files up, and a count of the pools actually started."""
    from vae_pipeline.data import pools

    started = []

    class Counted(pools.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args[0] if args else kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(pools, "POOL_THRESHOLD", 16)
    monkeypatch.setattr(pools, "ProcessPoolExecutor", Counted)
    return started


def file_tree(folder):
    """Every file below `folder`: relative POSIX path -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def snapshot_images(raw):
    """The images of a raw snapshot, whichever its layout: relative path -> bytes (read from
    the shards through their manifests, or from `images/`)."""
    from vae_pipeline.data.shards import images_of, is_sharded

    if is_sharded(raw):
        return dict(sorted((record.path, data) for record, data in images_of(raw)))
    return file_tree(raw / "images")
