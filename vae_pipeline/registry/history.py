"""The alias history: every move appended to the registered model's tags (`history.000001`, ...,
JSON: who, when, why, the metrics on both sides), read back in order."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from mlflow.tracking import MlflowClient

from vae_pipeline.registry.versions import get_registered_model

log = logging.getLogger(__name__)


HISTORY_PREFIX = "history."


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every alias move on `name`, oldest first."""
    model = get_registered_model(client, name)
    if model is None:
        return []
    tags = model.tags or {}
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(HISTORY_PREFIX)]


def record_event(client: MlflowClient, name: str, event: dict) -> dict:
    """Append an event (call with the lock held: the sequence number is read, then written)."""
    seq = max((int(e.get("seq", 0)) for e in history(client, name)), default=0) + 1
    event = {"seq": seq, "at": utc_now(), **event}
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(event))
    return event


def event_side(mv, metric: str, value: float | None = None) -> dict | None:
    if mv is None:
        return None
    tags = mv.tags or {}
    side = {"version": str(mv.version), "run_id": mv.run_id}
    for key in (metric, "active_units", "test_data_version"):
        if key in tags:
            side[key] = tags[key]
    if value is not None:
        side[metric] = value
    return side
