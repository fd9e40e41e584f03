"""Retrains as Prefect events: what the monitor emits, and the trigger the `retrain` deployment
carries (rendered into prefect.yaml by `vae-pipeline deploy`).

    vae-pipeline.drift.detected       the monitor found the new images shifted
    vae-pipeline.retrain.requested    a retrain is wanted for another reason: the monitor's
                                      `always`, or a team's own event (a new S3 prefix, a
                                      webhook): see docs/orchestration.md

Both concern a data source: the resource `vae-pipeline.source.<source>`; the payload's
`retrain_source` is the source the retrain ingests (the monitored one under
monitor.retrain_on = monitored). The trigger runs the `retrain` deployment once per event; its
concurrency limit (one run at a time, the rest enqueued) and the retrain's caching keep a
second event during a run from training twice on the same data.
"""

from __future__ import annotations

import math

DRIFT_EVENT = "vae-pipeline.drift.detected"
REQUEST_EVENT = "vae-pipeline.retrain.requested"
RESOURCE_PREFIX = "vae-pipeline.source."
TRIGGER_NAME = "retrain-on-event"

# The decision's numbers that go into the payload (what the UI's event page then shows).
STATISTICS = (
    "shift",
    "stderr",
    "lower_bound",
    "upper_bound",
    "threshold",
    "confidence",
    "new_mean",
    "new_n",
    "reference_mean",
    "reference_n",
    "mmd2",
    "mmd_p",
)


def retrain_trigger() -> dict:
    """The `retrain` deployment's trigger, as prefect.yaml spells it: either event, on any
    `vae-pipeline.source.*` resource, runs the deployment with the payload's source."""
    return {
        "type": "event",
        "name": TRIGGER_NAME,
        "enabled": True,
        "match": {"prefect.resource.id": f"{RESOURCE_PREFIX}*"},
        "expect": [DRIFT_EVENT, REQUEST_EVENT],
        # an event without a retrain_source renders "": the retrain then uses data.source
        "parameters": {"source": "{{ event.payload.retrain_source }}"},
    }


def _finite(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def retrain_event(report: dict, retrain_source: str, model_name: str) -> dict:
    """The event for a monitor report that decided to retrain (keyword arguments of
    `prefect.events.emit_event`)."""
    return {
        "event": DRIFT_EVENT if report["drift"] else REQUEST_EVENT,
        "resource": {
            "prefect.resource.id": f"{RESOURCE_PREFIX}{report['source']}",
            "prefect.resource.name": report["source"],
        },
        "related": [
            {
                "prefect.resource.id": f"vae-pipeline.model.{model_name}.v"
                f"{report['champion_version']}",
                "prefect.resource.role": "champion",
                "prefect.resource.name": f"{model_name} v{report['champion_version']}",
            }
        ],
        "payload": {
            "source": report["source"],
            "retrain_source": retrain_source,
            "reason": report["reason"],
            "drift": report["drift"],
            "new_images": report["new_images"],
            "champion_version": report["champion_version"],
            "champion_test_data_version": report["champion_test_data_version"],
            "statistics": {k: _finite(report[k]) for k in STATISTICS if k in report},
            "checks": [
                {"name": c["name"], "fired": c["fired"], "line": c["line"]}
                for c in report.get("checks", [])
            ],
        },
    }


def emit_retrain_event(report: dict, retrain_source: str, model_name: str):
    """Emit the event; returns it (None where this process sends no events: no server)."""
    from prefect.events import emit_event

    return emit_event(**retrain_event(report, retrain_source, model_name))
