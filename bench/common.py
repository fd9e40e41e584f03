"""Shared by the benchmarks (run as `python bench/<name>.py`, so this folder is on sys.path)."""

from __future__ import annotations

import time

import torch


def gemm_gflops(
    n: int = 2048, repeats: int = 10, device: torch.device = torch.device("cpu")
) -> float:
    """This machine's fp32 matrix-multiply rate now: the ceiling FLOP rates are compared to."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync()
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9
