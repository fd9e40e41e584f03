"""The `retrain` Prefect flow: version data -> prepare -> train -> evaluate -> register -> promote.

Each task is a thin wrapper over `vae_pipeline.pipeline`. Runs without a Prefect server
(ephemeral) unless PREFECT_API_URL points at one.

    python -m flows.retrain --set train.epochs=1      # or: vae-pipeline retrain
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vae_pipeline.config import Config, apply_quiet_offline_defaults, load_config, tracking_uri

apply_quiet_offline_defaults()  # Prefect reads its settings at import

from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from vae_pipeline import pipeline, tracking, versioning  # noqa: E402
from vae_pipeline.evaluate import summary_markdown  # noqa: E402
from vae_pipeline.registry import decision_dict  # noqa: E402

# Network-touching steps retry; training does not (a divergence would only diverge again).
NETWORK = {"retries": 2, "retry_delay_seconds": 5, "cache_policy": NO_CACHE}
LOCAL = {"cache_policy": NO_CACHE}


@task(name="preflight", **NETWORK)
def preflight(cfg: Config, workdir: Path) -> None:
    tracking.preflight(tracking_uri(cfg, workdir))


@task(name="version-data", **NETWORK)
def version_data(cfg: Config, workdir: Path) -> str:
    return pipeline.ingest(cfg, workdir)


@task(name="prepare", **LOCAL)
def prepare(cfg: Config, workdir: Path) -> dict:
    return pipeline.prepare_data(cfg, workdir)


@task(name="open-mlflow-run", **NETWORK)
def open_run(cfg: Config, workdir: Path, data_version: str) -> str:
    tags = {
        "data_version": data_version,
        "git_commit": versioning.git_commit(workdir),
        "params_hash": cfg.params_hash(),
        "flow_run_id": str(flow_run.id or ""),
    }
    name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    return tracking.start_run(cfg, tracking_uri(cfg, workdir), workdir, name, tags)


@task(name="train", **LOCAL)
def train(cfg: Config, workdir: Path, out_dir: Path, run_id: str) -> Path:
    return pipeline.train(cfg, workdir, out_dir, run_id)


EVALUATION_ARTIFACT = "evaluation-summary"


@task(name="evaluate", **LOCAL)
def evaluate(cfg: Config, workdir: Path, out_dir: Path) -> dict:
    """Evaluate; the metrics table (reports/summary.md) becomes the run's Markdown artifact."""
    metrics = pipeline.evaluate_model(cfg, str(out_dir), workdir)
    create_markdown_artifact(
        key=EVALUATION_ARTIFACT,
        markdown=f"# {cfg.registry.model_name}: test evaluation\n\n{summary_markdown(metrics)}",
        description="ELBO components, IW NLL, bits/dim, I(x;z), active units, with stderrs",
    )
    return metrics


@task(name="register", **NETWORK)
def register(cfg: Config, workdir: Path, run_id: str, weights: Path, metrics: dict) -> str:
    return pipeline.register(
        cfg, run_id, weights, metrics, workdir, {"flow_run_id": str(flow_run.id or "")}
    )


@task(name="promote", **NETWORK)
def promote(cfg: Config, workdir: Path, version: str) -> dict:
    actor = f"prefect flow run {flow_run.id}" if flow_run.id else None
    return decision_dict(pipeline.promote(cfg, version, workdir, actor))


@flow(name="retrain")
def retrain(
    params: str = "params.yaml", overrides: list[str] | None = None, workdir: str = "."
) -> dict:
    """Retrain the ConvVAE on the current data and promote it if it is better."""
    root = Path(workdir).resolve()
    cfg = load_config(root / params, overrides or [])
    preflight(cfg, root)  # an unreachable MLflow fails here, not after training
    data_version = version_data(cfg, root)
    prepare(cfg, root)
    run_id = open_run(cfg, root, data_version)
    uri = tracking_uri(cfg, root)
    try:
        out_dir = Path("runs") / run_id
        weights = train(cfg, root, out_dir, run_id)
        metrics = evaluate(cfg, root, out_dir)
        version = register(cfg, root, run_id, weights, metrics)
        decision = promote(cfg, root, version) if cfg.promotion.enabled else None
    except BaseException:
        tracking.finish_run(uri, run_id, "FAILED")
        raise
    tracking.finish_run(uri, run_id)
    summary = {
        "data_version": data_version,
        "run_id": run_id,
        "model_version": version,
        "metrics": {
            k: metrics[k] for k in ("elbo", "recon", "kl", "iw_nll", "bits_per_dim", "active_units")
        },
        "decision": decision,
    }
    print(format_summary(cfg, summary))
    return summary


def format_summary(cfg: Config, summary: dict) -> str:
    m, d = summary["metrics"], summary["decision"]
    lines = [
        f"retrain finished: {cfg.registry.model_name} v{summary['model_version']} "
        f"(MLflow run {summary['run_id']}, data version {summary['data_version']})",
        f"  test elbo {m['elbo']:.2f}  recon {m['recon']:.2f}  kl {m['kl']:.2f}  "
        f"iw_nll {m['iw_nll']:.2f} nats  {m['bits_per_dim']:.4f} bits/dim  "
        f"{m['active_units']} active units",
    ]
    if d is None:
        lines.append("  promotion disabled: champion alias untouched")
    else:
        verdict = "promoted to champion" if d["promoted"] else "kept as challenger"
        lines.append(f"  gate: {verdict}: {d['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    from vae_pipeline.cli import main

    sys.exit(main(["retrain", *sys.argv[1:]]))
