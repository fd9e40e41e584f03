"""The registry's commands: register, promote, rollback, history, lineage."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.errors import UserError

log = logging.getLogger(__name__)


def cmd_register(cfg: Config, args) -> None:
    from vae_pipeline import pipeline, tracking, versioning
    from vae_pipeline.config.environment import tracking_uri
    from vae_pipeline.train.checkpoint import load

    model_dir = Path(args.model or cfg.train.out_dir)
    weights = model_dir / "model.pt" if model_dir.is_dir() else model_dir
    metrics_path = Path(cfg.evaluate.reports_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise UserError(f"{metrics_path} not found: run `vae-pipeline evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    meta = load(weights)
    uri = tracking_uri(cfg)
    run_id = tracking.start_run(
        cfg,
        uri,
        Path("."),
        "register",
        {"data_version": str(meta.get("data_version")), "git_commit": versioning.git_commit()},
    )
    version = pipeline.register(cfg, run_id, weights, metrics)
    tracking.finish_run(uri, run_id)
    print(version)


def cmd_promote(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    decision = pipeline.promote(cfg, args.model_version)
    print(json.dumps(decision.__dict__, indent=2))


def _registry_client(cfg: Config):
    from vae_pipeline.config.environment import tracking_uri
    from vae_pipeline.tracking import client_for

    return client_for(tracking_uri(cfg))


def cmd_rollback(cfg: Config, args) -> None:
    from vae_pipeline.config.environment import tracking_uri
    from vae_pipeline.registry.promotion import rollback

    event = rollback(cfg, tracking_uri(cfg), args.reason, args.to_version)
    print(
        f"{cfg.registry.model_name}: champion v{event['from_champion']} -> v{event['version']} "
        f"(rollback #{event['seq']}: {event['reason']})"
    )


def cmd_history(cfg: Config, args) -> None:
    from vae_pipeline.registry.history import history

    events = history(_registry_client(cfg), cfg.registry.model_name)
    if args.json:
        for event in events:
            print(json.dumps(event))
        return
    if not events:
        print(f"{cfg.registry.model_name}: no alias moves yet")
    for e in events:
        metric = e.get("metric", "iw_nll")
        cand, champ = e.get("candidate") or {}, e.get("champion") or {}
        sides = f"v{cand.get('version')} {metric} {_num(cand.get(metric))}"
        if champ:
            sides += f" | champion v{champ.get('version')} {metric} {_num(champ.get(metric))}"
        print(
            f"#{e['seq']:<3} {e['at']}  {e['action']:<8} {e['alias']:<10} -> v{e['version']:<4} "
            f"by {e.get('by')}\n      {sides}\n      why: {e.get('reason')}"
        )


def _num(value) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "?"


def cmd_lineage(cfg: Config, args) -> None:
    from vae_pipeline.lineage import version_lineage

    client = _registry_client(cfg)
    if args.restore:
        from vae_pipeline.lineage import restore

        name = cfg.registry.model_name
        for line in restore(client, name, args.model_version, Path("."), Path(args.params)):
            print(line)
        return
    info = version_lineage(client, cfg.registry.model_name, args.model_version)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['name']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}")
    print(f"  run {info['run_id']}  source {info['source']}")
    for key in sorted(info["tags"]):
        if not key.startswith("gate_"):
            print(f"  {key:<20} {info['tags'][key]}")
    for key in ("gate_decision", "gate_reason"):
        if key in info["tags"]:
            print(f"  {key:<20} {info['tags'][key]}")
    print("reproduce:")
    for command in info["reproduce"]:
        print(f"  {command}")
