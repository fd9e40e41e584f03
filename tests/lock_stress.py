"""The promotion lock under contention: processes that meet one stale lock at the same moment
(run in spawned worker processes, so the pool is started once for many trials)."""

from __future__ import annotations

import multiprocessing
import time

from vae_pipeline.registry import lock as locks

from .registry_helpers import registry_cfg

STALE_S = 2.0


def contend(args: tuple[str, str, float, float]) -> tuple[float, float] | str:
    """Take the lock at `start_at`, hold it `hold_s`: (entered, left) wall times, or why not."""
    from vae_pipeline.tracking import client_for

    uri, name, start_at, hold_s = args
    client = client_for(uri)
    cfg = registry_cfg(uri, name=name, lock_timeout_s=120, lock_stale_s=STALE_S)
    time.sleep(max(0.0, start_at - time.time()))
    try:
        with locks.promotion_lock(client, name, cfg, "racer") as lock:
            entered = time.time()
            time.sleep(hold_s)
            lock.check()  # a holder that lost its lock as stale does not count as holding
            return entered, time.time()
    except locks.PromotionError as exc:
        return str(exc)


def trials(uri: str, n_trials: int, processes: int = 8, hold_s: float = 0.05) -> list[list]:
    """Per trial: a stale lock, then `processes` promoters at once; their holding intervals."""
    from vae_pipeline.tracking import client_for

    client = client_for(uri)
    results = []
    with multiprocessing.get_context("spawn").Pool(processes) as pool:
        pool.map(time.sleep, [0.0] * processes)  # every worker started and imported
        for trial in range(n_trials):
            name = f"stress-{trial}-{time.time_ns()}"
            client.create_registered_model(
                locks.lock_prefix(name) + "dead", tags={"owner": "a dead process"}
            )
            time.sleep(STALE_S + 0.2)
            start_at = time.time() + 0.5
            results.append(pool.map(contend, [(uri, name, start_at, hold_s)] * processes))
            assert locks.lock_entries(client, name) == [], "entries left after the trial"
    return results


def overlaps(intervals: list[tuple[float, float]]) -> list[tuple]:
    """Pairs of holding intervals that overlap in time."""
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]
