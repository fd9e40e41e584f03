"""summary.md: the evaluation's metrics and the uses as Markdown (also the MLflow run's
description and the Prefect artifacts)."""

from __future__ import annotations

import logging
import math

from vae_pipeline.evaluate.anomaly import UNITS

log = logging.getLogger(__name__)


def summary_markdown(metrics: dict) -> str:
    """The evaluation as a Markdown table (a Prefect artifact, a PR comment, the run's notes)."""
    rows = [
        ("ELBO", "elbo", "nats/example"),
        ("reconstruction", "recon", "nats/example"),
        ("KL", "kl", "nats/example"),
        (f"IW NLL (K={metrics.get('iw_k')})", "iw_nll", "nats/example"),
        (f"bits/dim (D = {metrics.get('pixels')})", "bits_per_dim", "bits"),
        (
            f"mutual information I(x;z) (ceiling log N = {metrics.get('mutual_info_ceiling', 0):.2f})",
            "mutual_info",
            "nats",
        ),
        ("active units", "active_units", "units"),
    ]
    if "iw_ess_mean" in metrics:
        rows.insert(4, ("IW effective sample size, mean (min)", "iw_ess_mean", "samples"))
    lines = [
        f"Test data version `{metrics.get('data_version')}`, {metrics.get('n_examples')} images, "
        f"{metrics.get('likelihood', 'bernoulli')} likelihood, "
        f"binarize `{metrics.get('binarize')}`, seed {metrics.get('eval_seed')}.",
        "",
        "| metric | value | stderr | unit |",
        "|---|---|---|---|",
    ]
    for label, key, unit in rows:
        stderr = metrics.get(f"{key}_stderr")
        shown = f"{stderr:.3g}" if isinstance(stderr, float) and math.isfinite(stderr) else ""
        value = metrics[key]
        if key == "iw_ess_mean":
            shown = f"min {metrics['iw_ess_min']:.3g}"
        lines.append(f"| {label} | {value:.4g} | {shown} | {unit} |")
    lines += uses_markdown(metrics)
    return "\n".join(lines) + "\n"


def uses_markdown(metrics: dict) -> list[str]:
    """The uses' section of summary.md: anomaly detection, few-label probe, sample quality."""
    if "anomaly_threshold" not in metrics:
        return []
    m = metrics
    held = m.get("holdout_class")
    lines = ["", "**Uses**", "", "| use | metric | value |", "|---|---|---|"]
    if "anomaly_auroc" in m:
        lines += [
            f"| anomaly detection (held-out class `{held}`) | AUROC | {m['anomaly_auroc']:.3f} |",
            f"| | AUPRC (anomalies are {m['anomaly_fraction']:.1%}) | {m['anomaly_auprc']:.3f} |",
            f"| | anomalies flagged at the threshold | {m['anomaly_recall']:.1%} |",
        ]
    lines += [
        f"| anomaly threshold | {m['anomaly_score']} > "
        f"p{m['anomaly_threshold_percentile']:g} of validation | {m['anomaly_threshold']:.2f} "
        f"{UNITS.get(m['anomaly_score'], 'nats')} |",
        f"| | normal test images flagged | {m['anomaly_flag_rate_normal']:.1%} |",
    ]
    for n in sorted(
        int(k.removeprefix("probe_latent_acc_n"))
        for k in m
        if k.startswith("probe_latent_acc_n") and not k.endswith("_std")
    ):
        lat, pix = f"probe_latent_acc_n{n}", f"probe_pixel_acc_n{n}"
        lines.append(
            f"| few-label probe, {n} labels/class | accuracy: latent means vs raw pixels "
            f"(chance {m['probe_chance']:.2f}) | {m[lat]:.3f} ± {m[lat + '_std']:.3f} vs "
            f"{m[pix]:.3f} ± {m[pix + '_std']:.3f} |"
        )
    if "sample_fd" in m:
        lines.append(
            f"| generation ({m['sample_fd_images']} samples) | sample_fd (real images: "
            f"{m['sample_fd_reference']:.3g}) | {m['sample_fd']:.3g} |"
        )
    return lines
