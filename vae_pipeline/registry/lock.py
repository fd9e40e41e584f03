"""Mutual exclusion for alias moves, kept in the registry itself so it works on a shared server.

A promoter takes the lock by creating a registered model of its own,
`<name>--promotion-lock--<token>`, then listing every such entry: it holds the lock when no
other live entry exists; otherwise it deletes its entry, waits a random moment and tries again.
At most one holder under any interleaving: of two entries, the one created later is listed by
its own creator's check (which follows both creations) unless the other was deleted first,
so both creators can never see themselves alone. No entry is ever deleted on someone else's
behalf except a stale one: older than `promotion.lock_stale_s` (its holder died), it is
ignored and removed. A holder re-checks that its entry still exists right before it moves an
alias (`HeldLock.check`): one that outlived `lock_stale_s` and was broken stops there, having
changed nothing. Waiting longer than `promotion.lock_timeout_s` is an error naming the holder.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline.config import Config
from vae_pipeline.errors import UserError

log = logging.getLogger(__name__)

LOCK_SUFFIX = "--promotion-lock"


class PromotionError(UserError):
    """A promotion, rollback or lock that cannot proceed; the message says what to do."""


def lock_prefix(name: str) -> str:
    return f"{name}{LOCK_SUFFIX}--"


def lock_entries(client: MlflowClient, name: str) -> list:
    """Every lock entry of `name` (registered models), oldest first."""
    prefix = lock_prefix(name)
    found = client.search_registered_models(
        filter_string=f"name LIKE '{prefix}%'", max_results=1000
    )
    entries = [m for m in found if m.name.startswith(prefix)]
    return sorted(entries, key=lambda m: (m.creation_timestamp, m.name))


def _delete(client: MlflowClient, entry: str) -> bool:
    """Delete a lock entry; False when it was gone already (released or broken by another)."""
    try:
        client.delete_registered_model(entry)
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return False
    return True


def break_stale(client: MlflowClient, entry, age_s: float) -> bool:
    """Remove a stale lock entry (its holder died). Only the promoter whose delete removed it
    says so, however many met it at once; returns whether this one did."""
    broke = _delete(client, entry.name)
    if broke:
        log.warning(
            "breaking a promotion lock held by %s for %.0f s (> promotion.lock_stale_s)",
            (entry.tags or {}).get("owner"),
            age_s,
        )
    return broke


@dataclass
class HeldLock:
    client: MlflowClient
    entry: str

    def check(self) -> None:
        """Raise unless this holder's entry still exists (it was not broken as stale)."""
        try:
            self.client.get_registered_model(self.entry)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            raise PromotionError(
                f"the promotion lock {self.entry!r} was broken while held (older than "
                "promotion.lock_stale_s): nothing was changed; retry, and raise "
                "promotion.lock_stale_s above the longest promotion"
            ) from None


@contextlib.contextmanager
def promotion_lock(client: MlflowClient, name: str, cfg: Config, actor: str) -> Iterator[HeldLock]:
    """Hold the promotion lock of registered model `name` for the `with` block."""
    deadline = time.monotonic() + cfg.promotion.lock_timeout_s
    while True:
        entry = lock_prefix(name) + uuid.uuid4().hex[:12]
        client.create_registered_model(
            entry,
            tags={"owner": actor, "acquired_at": datetime.now(UTC).isoformat(timespec="seconds")},
            description=f"Lock for alias moves on {name}; delete it only if its owner is gone.",
        )
        live = []
        for other in lock_entries(client, name):
            if other.name == entry:
                continue
            age_s = time.time() - other.creation_timestamp / 1000.0
            if age_s > cfg.promotion.lock_stale_s:
                break_stale(client, other, age_s)
            else:
                live.append(other)
        if not live:
            break
        _delete(client, entry)
        if time.monotonic() > deadline:
            raise PromotionError(_timeout_message(name, live[0], cfg))
        time.sleep(0.05 + random.random() * 0.45)
    try:
        yield HeldLock(client, entry)
    finally:
        _delete(client, entry)


def _timeout_message(name: str, holder, cfg: Config) -> str:
    """Who holds the lock and for how long, and how long this promoter waited for it."""
    owner = (holder.tags or {}).get("owner", "?")
    held_s = time.time() - holder.creation_timestamp / 1000.0
    return (
        f"another promotion of {name} (by {owner}) has held the lock {holder.name!r} for "
        f"{held_s:.0f} s; waited promotion.lock_timeout_s={cfg.promotion.lock_timeout_s:g} s "
        f"for it. If that process is gone, delete the registered model {holder.name!r} (or "
        f"wait until it is older than promotion.lock_stale_s={cfg.promotion.lock_stale_s:g} s) "
        "and retry"
    )
