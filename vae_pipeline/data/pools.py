"""Worker processes for checking and decoding images (ingest and prepare): in-process for
small jobs, a forkserver pool (safe after torch has started threads) for large ones."""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from itertools import islice

from tqdm import tqdm

from vae_pipeline.config import Config

POOL_THRESHOLD = 4096  # fewer files are handled in-process: a pool costs 1-3 s to start (bench/)


def worker_count(cfg: Config) -> int:
    return cfg.data.decode_workers or len(os.sched_getaffinity(0))


def _run_batch(fn, batch: list) -> list:
    return [fn(item) for item in batch]


def map_bounded(
    fn, items: Iterable, total: int, workers: int, desc: str, batch: int = 256
) -> Iterator:
    """`map(fn, items)` in `workers` processes, in order, with at most 2 x workers batches in
    flight: memory stays bounded however many items (and results, such as file bytes) there
    are. In-process below POOL_THRESHOLD items."""
    bar = tqdm(total=total, desc=desc, unit="img", mininterval=2.0, disable=total < 1000)
    if workers <= 1 or total < POOL_THRESHOLD:
        for item in items:
            yield fn(item)
            bar.update()
        bar.close()
        return
    it = iter(items)
    ctx = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool, bar:
        inflight: deque = deque()

        def submit() -> None:
            chunk = list(islice(it, batch))
            if chunk:
                inflight.append(pool.submit(_run_batch, fn, chunk))

        for _ in range(2 * workers):
            submit()
        while inflight:
            results = inflight.popleft().result()
            submit()
            bar.update(len(results))
            yield from results
