"""Deployments of the `retrain` and `monitor` flows, from params.yaml.

`prefect.yaml` is rendered from params (orchestration.*, monitor.*), so the schedule and the
work pool live in one place; `vae-pipeline deploy` writes it, makes sure the work pool
(type process) and the training lock exist, and runs `prefect deploy --all` on it. Plain
`prefect deploy --all` reads the same file.

    vae-pipeline deploy                  # needs PREFECT_API_URL (a running Prefect server)
    prefect worker start --pool vae-pipeline
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml

from flows.events import retrain_trigger
from vae_pipeline.config import Config
from vae_pipeline.errors import UserError

PREFECT_FILE = "prefect.yaml"
HEADER = """\
# Prefect deployments of vae-pipeline, rendered from params.yaml (orchestration.*, monitor.*)
# by `vae-pipeline deploy`: change those and run it again rather than editing this file.
# `prefect deploy --all` reads it as it is; workers run the flows in the folder it was
# deployed from (no pull step: Prefect records that folder as the working directory).
"""


def _schedule(cron: str | None, tz: str, slug: str, parameters: dict | None = None) -> list:
    if cron is None:
        return []
    entry: dict = {"cron": cron, "timezone": tz, "slug": slug}
    if parameters:
        entry["parameters"] = parameters
    return [entry]


def render(
    cfg: Config, overrides: list[str] = (), workdir: str | None = None, params: str | None = None
) -> str:
    """prefect.yaml for `cfg`: the retrain and monitor deployments on orchestration.work_pool.
    `overrides` (the --set given to deploy) become the runs' default `overrides` parameter;
    `workdir` (with the absolute `params` file) makes the runs work in that folder rather than
    the deploy folder, as a container does with its state volume (infra/compose.yaml)."""
    o, m = cfg.orchestration, cfg.monitor
    extra: dict = {"overrides": list(overrides)} if overrides else {}
    if workdir is not None:
        extra = {"workdir": workdir, "params": params or "params.yaml", **extra}

    # fresh mappings and lists for each deployment: no YAML anchors in the file
    def pool() -> dict:
        return {"name": o.work_pool, "work_queue_name": None, "job_variables": {}}

    doc = {
        "name": "vae-pipeline",
        "prefect-version": _prefect_version(),
        "deployments": [
            {
                "name": "retrain",
                "description": "Version data, prepare, train (torchrun), evaluate, register "
                "and promote the ConvVAE.",
                "entrypoint": "flows/retrain.py:retrain",
                "parameters": copy.deepcopy(extra),
                "work_pool": pool(),
                # one retrain of this deployment at a time (they share the working folder);
                # the training lock (orchestration.train_lock) covers every other retrain
                "concurrency_limit": {"limit": 1, "collision_strategy": "ENQUEUE"},
                "schedules": _schedule(o.retrain_cron, o.timezone, "retrain-cron"),
                # run on the monitor's drift event and on any retrain request (flows/events.py)
                "triggers": [retrain_trigger()],
            },
            {
                "name": "monitor",
                "description": "Score new images with the champion; start the retrain "
                "deployment when they have shifted.",
                "entrypoint": "flows/monitor.py:monitor",
                "parameters": {"retrain_deployment": "retrain/retrain", **copy.deepcopy(extra)},
                "work_pool": pool(),
                "concurrency_limit": {"limit": 1, "collision_strategy": "CANCEL_NEW"},
                "schedules": _schedule(
                    m.cron, o.timezone, "monitor-cron", {"always": m.always_retrain}
                ),
            },
        ],
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False)


def _prefect_version() -> str:
    from importlib.metadata import version

    return version("prefect")


def write(
    cfg: Config,
    root: Path,
    overrides: list[str] = (),
    workdir: str | None = None,
    params: str | None = None,
) -> Path:
    path = root / PREFECT_FILE
    text = render(cfg, overrides, workdir, params)
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)
    return path


def ensure_work_pool(name: str) -> bool:
    """Create the process work pool `name` if missing; True when it was created."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
            return False
        except ObjectNotFound:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
            return True


class DeployError(UserError):
    """The deployments could not be created; the message says why and what to do."""


def deploy(
    cfg: Config,
    root: Path,
    overrides: list[str] = (),
    workdir: str | None = None,
    params: str | None = None,
) -> list[str]:
    """Write prefect.yaml, make sure the pool and the training lock exist, deploy; returns
    the deployment names. `workdir`/`params`: see `render`."""
    from vae_pipeline.config.environment import apply_quiet_offline_defaults

    apply_quiet_offline_defaults(root)
    if not os.environ.get("PREFECT_API_URL"):
        raise DeployError(
            "PREFECT_API_URL is not set: deployments live on a Prefect server. Start one "
            "(`prefect server start`) and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    from flows.retrain import ensure_concurrency_limit, train_lock_name

    path = write(cfg, root, overrides, workdir, params)
    created = ensure_work_pool(cfg.orchestration.work_pool)
    ensure_concurrency_limit(train_lock_name(cfg), cfg.orchestration.train_lock_slots)
    prefect = Path(sys.executable).with_name("prefect")
    cmd = [str(prefect), "--no-prompt", "deploy", "--all", "--prefect-file", str(path)]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        raise DeployError(f"`prefect deploy --all` failed:\n{result.stdout}\n{result.stderr}")
    if created:
        print(f"created work pool {cfg.orchestration.work_pool!r} (type process)")
    return ["retrain/retrain", "monitor/monitor"]
