"""Shared by the benchmarks (run as `python bench/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time

import torch


def gemm_gflops(n: int = 2048, repeats: int = 10) -> float:
    """This machine's fp32 matrix-multiply rate now: the ceiling FLOP rates are compared to."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
