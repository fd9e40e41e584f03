"""The pipeline's commands: ingest, prepare, train, evaluate, retrain, monitor, deploy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.errors import UserError

log = logging.getLogger(__name__)


def cmd_ingest(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(pipeline.ingest(cfg, push=not args.no_push))


def cmd_prepare(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(json.dumps(pipeline.prepare_data(cfg)["counts"]))


def cmd_train(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(pipeline.train(cfg, out_dir=args.out_dir, run_id=args.mlflow_run_id))


def cmd_evaluate(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    metrics = pipeline.evaluate_model(cfg, args.model or cfg.train.out_dir)
    print(json.dumps(metrics, indent=2))


def cmd_retrain(cfg: Config, args) -> None:
    from flows.retrain import retrain

    retrain(
        params=str(args.params),
        overrides=args.overrides,
        source=args.source,
        promote=False if args.no_promote else None,
        force=args.force,
    )


def cmd_monitor(cfg: Config, args) -> None:
    from flows.monitor import monitor
    from vae_pipeline.monitor.check import check_source, monitor_source

    check_source(monitor_source(cfg, args.source))  # a wrong path: one line, before the flow

    monitor(
        params=str(args.params),
        overrides=args.overrides,
        source=args.source,
        always=True if args.always else None,
        retrain_deployment=args.retrain_deployment,
        retrain=not args.no_retrain,
    )


def _deploy_workdir(args) -> tuple[str | None, str | None]:
    """(workdir, absolute params path) for deployments that run in --workdir; (None, None)."""
    if args.workdir is None:
        return None, None
    return str(Path(args.workdir).resolve()), str(Path(args.params).resolve())


def cmd_deploy(cfg: Config, args) -> None:
    from flows import deploy

    root = Path(".").resolve()
    if args.check:
        path = root / deploy.PREFECT_FILE
        expected = deploy.render(cfg, args.overrides, *_deploy_workdir(args))
        if not path.is_file() or path.read_text() != expected:
            raise DeployMismatch(
                f"{path.name} does not match {args.params}: run `vae-pipeline deploy` (or "
                "render it and commit the change)"
            )
        print(f"{path.name} matches {args.params}")
        return
    for name in deploy.deploy(cfg, root, args.overrides, *_deploy_workdir(args)):
        print(f"deployed {name}")
    o = cfg.orchestration
    print(
        f"schedules: retrain {o.retrain_cron or 'none'}, monitor {cfg.monitor.cron or 'none'} ({o.timezone})"
    )
    print(f"start a worker: prefect worker start --pool {o.work_pool}")


class DeployMismatch(UserError):
    """prefect.yaml is stale."""
