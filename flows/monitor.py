"""The `monitor` Prefect flow: score new images with the champion; retrain on a shift.

It snapshots monitor.source (incrementally, checking every image as ingest does), scores a
sample with the champion (negative ELBO, nats per image) and compares the mean with the
champion's own test set (vae_pipeline.monitor). When the shift's lower confidence bound passes
monitor.threshold_nats, or when the schedule says `always`, it starts `retrain`: through the
`retrain_deployment` (on a work pool, not waiting for it) when given, else as a subflow here.
A Markdown artifact `drift-report` records the numbers and the decision.

    vae-pipeline monitor --source incoming/
"""

from __future__ import annotations

import sys
from pathlib import Path

from vae_pipeline.config import apply_quiet_offline_defaults, load_config, tracking_uri

apply_quiet_offline_defaults()  # Prefect reads its settings at import

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from flows.retrain import retry_options  # noqa: E402
from vae_pipeline import monitor as drift  # noqa: E402

DRIFT_ARTIFACT = "drift-report"


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift(cfg, workdir: Path, source: str | None, always: bool | None) -> dict:
    return drift.check_drift(cfg, tracking_uri(cfg, workdir), workdir, source, always)


@flow(name="monitor")
def monitor(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    workdir: str = ".",
    source: str | None = None,
    always: bool | None = None,
    retrain_deployment: str | None = None,
) -> dict:
    """Score new data with the champion; start a retrain when it has shifted.

    Args:
        params: params file, relative to `workdir`.
        overrides: `section.key=value` overrides, as `--set` takes them.
        workdir: the project (DVC repo) folder.
        source: where new images land (monitor.source, else data.source, otherwise).
        always: retrain whatever the shift (monitor.always_retrain otherwise).
        retrain_deployment: start the retrain as this deployment ("retrain/retrain") instead
            of a subflow in this process.
    """
    root = Path(workdir).resolve()
    cfg = load_config(root / params, overrides or [])
    check = check_drift.with_options(
        timeout_seconds=cfg.orchestration.step_timeout_s, **retry_options(cfg)
    )
    report = check(cfg, root, source, always)
    logger = get_run_logger()
    report["started"] = _start_retrain(report, params, overrides, workdir, retrain_deployment)
    create_markdown_artifact(
        key=DRIFT_ARTIFACT, markdown=drift_markdown(cfg, report), description=report["reason"]
    )
    logger.info("monitor: %s", report["reason"])
    print(format_report(report))
    return report


def _start_retrain(
    report: dict, params: str, overrides, workdir: str, deployment: str | None
) -> dict | None:
    """None when no retrain is due; else what was started."""
    if not report["retrain"]:
        return None
    parameters = {"params": params, "overrides": overrides or [], "workdir": workdir}
    if deployment:
        from prefect.deployments import run_deployment

        run = run_deployment(deployment, parameters=parameters, timeout=0)
        return {"deployment": deployment, "flow_run_id": str(run.id), "state": run.state_name}
    from flows.retrain import retrain

    summary = retrain(**parameters)
    return {"subflow": "retrain", **summary}


def drift_markdown(cfg, r: dict) -> str:
    started = r["started"]
    if started is None:
        action = "no retrain"
    elif "deployment" in started:
        action = (
            f"retrain started: deployment `{started['deployment']}`, "
            f"flow run `{started['flow_run_id']}`"
        )
    else:
        action = f"retrain ran here: {cfg.registry.model_name} v{started['model_version']}"
    return (
        f"# monitor: {'drift' if r['drift'] else 'no drift'}\n\n"
        f"- **Source:** `{r['source']}`: {r['new_images']} new of {r['snapshot_images']} images\n"
        f"- **Champion:** {cfg.registry.model_name} v{r['champion_version']} (test data "
        f"`{r['champion_test_data_version']}`)\n"
        f"- **Decision:** {r['reason']}\n- **Action:** {action}\n\n"
        "| | images | mean negative ELBO (nats) |\n|---|---|---|\n"
        f"| new (scored) | {r['new_n']} | {r['new_mean']:.2f} |\n"
        f"| champion's test set | {r['reference_n']} | {r['reference_mean']:.2f} |\n\n"
        f"Shift {r['shift']:+.2f} ± {r['stderr']:.2f} (stderr); {r['confidence']:.0%} lower "
        f"bound {r['lower_bound']:+.2f} against threshold {r['threshold']:g}.\n"
    )


def format_report(r: dict) -> str:
    lines = [
        f"monitor: {r['new_images']} new of {r['snapshot_images']} images in {r['source']}; "
        f"champion v{r['champion_version']}'s test set: {r['reference_n']} images",
        f"  mean negative ELBO {r['new_mean']:.2f} (new, {r['new_n']} scored) vs "
        f"{r['reference_mean']:.2f} nats: shift {r['shift']:+.2f} ± {r['stderr']:.2f}",
        f"  {r['reason']}",
    ]
    started = r["started"]
    if started is not None:
        where = started.get("deployment") or "a subflow"
        lines.append(f"  retrain started ({where})")
    return "\n".join(lines)


if __name__ == "__main__":
    from vae_pipeline.cli import main

    sys.exit(main(["monitor", *sys.argv[1:]]))
