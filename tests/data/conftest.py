"""Fixtures for the data tests."""

import pytest


@pytest.fixture
def pools(monkeypatch):
    """Worker pools from 16 files up, and a count of the pools actually started."""
    from vae_pipeline.data import sources

    started = []

    class Counted(sources.ProcessPoolExecutor):
        def __init__(self, *args, **kwargs):
            started.append(args[0] if args else kwargs.get("max_workers"))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(sources, "POOL_THRESHOLD", 16)
    monkeypatch.setattr(sources, "ProcessPoolExecutor", Counted)
    return started


def file_tree(folder):
    """Every file below `folder`: relative POSIX path -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
