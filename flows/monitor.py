"""The `monitor` Prefect flow: score new images with the champion; retrain on a shift.

It snapshots monitor.source (incrementally, checking every image as ingest does), scores a
sample with the champion and runs the drift checks of vae_pipeline.monitor: the mean negative
ELBO against the champion's own test set, both ways, and the encoder means against prepared
test images (an MMD permutation test). When a check fires, or when the schedule says
`always`, it starts `retrain`. Deployed (`retrain_deployment` given), it emits the event
`vae-pipeline.drift.detected` (or `vae-pipeline.retrain.requested` for `always`), with the
source, the statistics and the champion version in its payload, and the `retrain`
deployment's trigger starts the run on a worker (flows/events.py); else the retrain runs as a
subflow here. With monitor.retrain_on = monitored (the default) that retrain ingests the
monitored source as its data (a new data version holding the new images). `retrain=False`
(`--no-retrain`) measures and reports the decision without starting one. A Markdown artifact
`drift-report` records the numbers and the decision.

    vae-pipeline monitor --source incoming/
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.retrain import retry_options
from vae_pipeline.config import load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.monitor import check as monitor_check

DRIFT_ARTIFACT = "drift-report"
NOT_STARTED = "{why}: a retrain would start; not started (--no-retrain)"


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(cfg, workdir: Path, source: str | None, always: bool | None) -> dict:
    return monitor_check.check_drift(cfg, tracking_uri(cfg, workdir), workdir, source, always)


@flow(name="monitor")
def monitor(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    workdir: str = ".",
    source: str | None = None,
    always: bool | None = None,
    retrain_deployment: str | None = None,
    retrain: bool = True,
) -> dict:
    """Score new data with the champion; start a retrain when it has shifted.

    Args:
        params: params file, relative to `workdir`.
        overrides: `section.key=value` overrides, as `--set` takes them.
        workdir: the project (DVC repo) folder.
        source: where new images land (monitor.source, else data.source, otherwise).
        always: retrain whatever the shift (monitor.always_retrain otherwise).
        retrain_deployment: the retrain is this deployment ("retrain/retrain"): emit the
            retrain event its trigger runs on (what `vae-pipeline deploy` sets up) instead of
            running a subflow in this process.
        retrain: False measures only: the decision is reported ("a retrain would start"),
            no retrain is started (`vae-pipeline monitor --no-retrain`).
    """
    root = Path(workdir).resolve()
    cfg = load_config(root / params, overrides or [])
    check = check_drift.with_options(
        timeout_seconds=cfg.orchestration.step_timeout_s, **retry_options(cfg)
    )
    report = check(cfg, root, source, always)
    logger = get_run_logger()
    report["not_started"] = (
        NOT_STARTED.format(why=_why(report)) if report["retrain"] and not retrain else None
    )
    report["started"] = (
        None
        if report["not_started"]
        else _start_retrain(cfg, report, params, overrides, workdir, retrain_deployment)
    )
    create_markdown_artifact(
        key=DRIFT_ARTIFACT, markdown=drift_markdown(cfg, report), description=report["reason"]
    )
    logger.info("monitor: %s", report["reason"])
    print(format_report(report))
    return report


def retrain_source(cfg, report: dict) -> str | None:
    """The data source a drift-triggered retrain ingests: the monitored one (monitor.retrain_on
    = monitored), else None (data.source, as scheduled)."""
    if cfg.monitor.retrain_on == "monitored" and report["source"] != cfg.data.source:
        return report["source"]
    return None


def _start_retrain(
    cfg, report: dict, params: str, overrides, workdir: str, deployment: str | None
) -> dict | None:
    """None when no retrain is due; else what was started."""
    if not report["retrain"]:
        return None
    parameters = {"params": params, "overrides": overrides or [], "workdir": workdir}
    source = retrain_source(cfg, report)
    if source is not None:
        parameters["source"] = source
    if deployment:
        from flows.events import emit_retrain_event

        target = source or cfg.data.source
        event = emit_retrain_event(report, target, cfg.registry.model_name)
        if event is None:  # no server to send events to: start the deployment directly
            from prefect.deployments import run_deployment

            run = run_deployment(deployment, parameters=parameters, timeout=0)
            return {"deployment": deployment, "flow_run_id": str(run.id),
                    "state": run.state_name, "source": target}  # fmt: skip
        return {"deployment": deployment, "event": event.event, "event_id": str(event.id),
                "source": target}  # fmt: skip
    from flows.retrain import retrain

    summary = retrain(**parameters)
    return {"subflow": "retrain", "source": source or cfg.data.source, **summary,
            "note": unchanged_note(cfg, summary, report["source"])}  # fmt: skip


def unchanged_note(cfg, summary: dict, source: str) -> str | None:
    """What to say when the retrain a drift started learned nothing new: its training was
    reused from an earlier run of the same inputs (its data version had no new image)."""
    states = {s["step"]: s["state"] for s in summary["steps"]}
    if states.get("train") != "Cached":
        return None
    why = (
        f"the new images land outside data.source {cfg.data.source!r}; set "
        "monitor.retrain_on=monitored to train on them"
        if source != cfg.data.source
        else "no image was added to the source since"
    )
    return (
        f"nothing new was learned: the retrain reused an earlier training on data version "
        f"{summary['data_version']} ({why})"
    )


def _why(report: dict) -> str:
    return "drift" if report["drift"] else "always_retrain"


def _action(cfg, started: dict | None, not_started: str | None = None) -> str:
    if started is None:
        return not_started or "no retrain"
    if "event" in started:
        action = (
            f"retrain requested on `{started['source']}`: event `{started['event']}` "
            f"(`{started['event_id']}`), which deployment `{started['deployment']}` runs on"
        )
    elif "deployment" in started:
        action = (
            f"retrain started on `{started['source']}`: deployment `{started['deployment']}`, "
            f"flow run `{started['flow_run_id']}`"
        )
    else:
        action = (
            f"retrain ran here on `{started['source']}`: {cfg.registry.model_name} "
            f"v{started['model_version']}, data version `{started['data_version']}`"
        )
    return action + (f"; NOTE: {started['note']}" if started.get("note") else "")


def drift_markdown(cfg, r: dict) -> str:
    lines = [
        f"# monitor: {'drift' if r['drift'] else 'no drift'}\n",
        f"- **Source:** `{r['source']}`: {r['new_images']} new of {r['snapshot_images']} images",
        f"- **Champion:** {cfg.registry.model_name} v{r['champion_version']} (test data "
        f"`{r['champion_test_data_version']}`)",
        f"- **Decision:** {r['reason']}",
        f"- **Action:** {_action(cfg, r['started'], r.get('not_started'))}\n",
    ]
    if r.get("latent_reference"):
        lines.insert(3, f"- **Latent reference:** {r['latent_reference']}")
    if r.get("fitting"):
        lines.insert(2, f"- **Fitting:** {r['fitting']}")
    if r.get("already_known"):
        lines[1] += f" ({_known(r)})"
    if r["checks"]:
        lines += ["| check | fired | what it measured |", "|---|---|---|"]
        lines += [
            f"| {c['name']} | {'yes' if c['fired'] else 'no'} | {c['line']} |" for c in r["checks"]
        ]
        lines.append(
            f"\nEach of the {len(r['checks'])} checks runs at level "
            f"{(1 - r['confidence']) / len(r['checks']):.3f}: the decision's false-alarm rate on "
            f"in-distribution images is at most {1 - r['confidence']:.0%}."
        )
    return "\n".join(lines) + "\n"


def _known(r: dict) -> str:
    return f"{r['already_known']} more already known: the pixels of prepared images"


def format_report(r: dict) -> str:
    known = f" ({_known(r)})" if r.get("already_known") else ""
    lines = [
        f"monitor: {r['new_images']} new of {r['snapshot_images']} images in {r['source']}"
        f"{known}; champion v{r['champion_version']}'s test set: {r['reference_n']} images",
        *([f"  fitted {r['fitting']}"] if r["checks"] and r.get("fitting") else []),
        *(f"  {c['line']}" for c in r["checks"]),
        *([f"  latent reference: {r['latent_reference']}"] if r.get("latent_reference") else []),
        f"  {r['reason']}",
        *([f"  {r['not_started']}"] if r.get("not_started") else []),
    ]
    started = r["started"]
    if started is not None:
        where = started.get("deployment") or "a subflow"
        if "event" in started:
            where = f"event {started['event']} -> deployment {where}"
        lines.append(f"  retrain started ({where}) on {started['source']}")
        if started.get("note"):
            lines.append(f"  NOTE: {started['note']}")
    return "\n".join(lines)
