"""The retrain's summary: the Markdown artifact `retrain-summary` and the lines it prints (data
version, metrics, the uses, the gate's decision, step timings, MLflow links)."""

from __future__ import annotations

from vae_pipeline.config import Config
from vae_pipeline.evaluate.report import uses_markdown
from vae_pipeline.registry.versions import champion
from vae_pipeline.tracking import client_for


def summary_artifact(cfg: Config, summary: dict) -> str:
    m, d = summary["metrics"], summary["decision"]
    links = summary["links"]
    if d is None:
        gate = "promotion disabled: the champion alias was not touched"
    else:
        verdict = _verdict(d, "**promoted to champion**")
        gate = f"{verdict}: {d['reason']}"
    rows = "\n".join(
        f"| {s['step']} | {s['seconds']:.1f} | {s['state']} |" for s in summary["steps"]
    )
    return (
        f"# retrain: {cfg.registry.model_name} v{summary['model_version']}\n\n"
        f"- **Data version:** `{summary['data_version']}`\n"
        f"- **MLflow run:** [{summary['run_id']}]({links['run']})\n"
        f"- **Model version:** [{cfg.registry.model_name} v{summary['model_version']}]"
        f"({links['model_version']})\n"
        f"- **Gate:** {gate}\n"
        + (
            f"- **Workspace:** {summary['workspace_note']}\n"
            if summary.get("workspace_note")
            else ""
        )
        + "\n"
        f"| metric (test) | value |\n|---|---|\n"
        f"| ELBO | {m['elbo']:.2f} |\n| reconstruction | {m['recon']:.2f} |\n"
        f"| KL | {m['kl']:.2f} |\n| IW NLL | {m['iw_nll']:.2f} |\n"
        f"| bits/dim | {m['bits_per_dim']:.4f} |\n| active units | {m['active_units']} |\n"
        + "\n".join(uses_markdown(m))
        + f"\n\n| step | seconds | state |\n|---|---|---|\n{rows}\n\n"
        + (f"{links['note']}\n" if links.get("note") else "")
    )


def format_summary(cfg: Config, summary: dict) -> str:
    m, d = summary["metrics"], summary["decision"]
    lines = [
        f"retrain finished: {cfg.registry.model_name} v{summary['model_version']} "
        f"(MLflow run {summary['run_id']}, data version {summary['data_version']})",
        f"  test elbo {m['elbo']:.2f}  recon {m['recon']:.2f}  kl {m['kl']:.2f}  "
        f"iw_nll {m['iw_nll']:.2f} nats  {m['bits_per_dim']:.4f} bits/dim  "
        f"{m['active_units']} active units",
    ]
    uses = [
        f"{label} {m[key]:.3f}"
        for key, label in (
            ("anomaly_auroc", f"AUROC ({m.get('holdout_class')} held out)"),
            ("probe_latent_acc_n100", "100-label probe accuracy"),
            ("sample_fd", "sample_fd"),
        )
        if key in m
    ]
    if uses:
        lines.append("  uses: " + "  ".join(uses))
    if d is None:
        lines.append("  promotion disabled: champion alias untouched")
    else:
        verdict = _verdict(d, "promoted to champion")
        lines.append(f"  gate: {verdict}: {d['reason']}")
    if summary.get("workspace_note"):
        lines.append(f"  NOTE: {summary['workspace_note']}")
    cached = [s["step"] for s in summary["steps"] if s["state"] == "Cached"]
    if cached:
        lines.append(f"  reused from an earlier run of the same inputs: {', '.join(cached)}")
    return "\n".join(lines)


def _verdict(d: dict, promoted: str) -> str:
    if d.get("unchanged"):
        return "already champion"
    return promoted if d["promoted"] else "kept as challenger"


def workspace_note(cfg: Config, uri: str, data_version: str, decision: dict | None) -> str | None:
    """When the champion stays and the workspace now holds other data than it was tested on
    (a retrain on new data that the gate rejected), what the workspace holds and how to go
    back; None otherwise. The drift monitor does not depend on it (it compares with the
    champion's own test split), but `dvc repro` and a plain `vae-pipeline evaluate` would."""
    if decision is None or decision["promoted"]:
        return None
    mv = champion(client_for(uri), cfg.registry.model_name)
    tested_on = None if mv is None else (mv.tags or {}).get("test_data_version")
    if mv is None or tested_on in (None, data_version):
        return None
    return (
        f"data/raw.dvc and {cfg.data.prepared_dir} now hold data version {data_version}; the "
        f"champion v{mv.version} was tested on {tested_on}. To work on the champion's data "
        f"again: `vae-pipeline lineage {mv.version} --restore`, `dvc pull data/raw.dvc`, "
        "`vae-pipeline prepare`"
    )
