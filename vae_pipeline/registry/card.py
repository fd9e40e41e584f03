"""The model card: what a reviewer needs before trusting a version, as its registry description.

Written from what the registry and the version's run already hold (nothing else is stored):
the test metrics with their units and K, the data version and split sizes, the gate's last
decision on the version and the paired difference it rested on, the aliases it holds and when
they moved, the training config in brief, and where its pictures are. Rewritten whenever the
registration, the gate or a rollback changes any of it (`write_card`); the history itself
stays in the alias history tags, as before.
"""

from __future__ import annotations

import logging

from mlflow.tracking import MlflowClient

from vae_pipeline.registry.history import history
from vae_pipeline.registry.versions import model_version

log = logging.getLogger(__name__)

# (label, run metric, unit); every ELBO term is nats per example (sum over pixels and latents)
METRICS = (
    ("ELBO", "test_elbo", "nats/example"),
    ("reconstruction", "test_recon", "nats/example"),
    ("KL", "test_kl", "nats/example"),
    ("IW NLL (K={k})", "test_iw_nll", "nats/example"),
    ("bits/dim", "test_bits_per_dim", "bits"),
    ("active units", "test_active_units", "units"),
)
TRAINING = (
    "data.source",
    "data.channels",
    "data.image_size",
    "model.latent_dim",
    "model.likelihood",
    "train.objective",
    "train.epochs",
    "train.batch_size",
    "train.lr",
    "train.binarize",
    "train.seed",
)
PICTURES = ("recon.png", "samples.png", "interpolation.png", "traversal.png", "kl_per_dim.png")
SPLIT_SIZES_TAG = "split_sizes"


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _metrics(run, tags: dict) -> list[str]:
    lines = ["| metric | value | unit |", "|---|---|---|"]
    for label, key, unit in METRICS:
        if key in run.data.metrics:
            value = run.data.metrics[key]
            shown = str(int(value)) if key == "test_active_units" else _number(value)
            lines.append(f"| {label.format(k=tags.get('iw_k', '?'))} | {shown} | {unit} |")
    return lines


def _gate(name: str, version: str, events: list[dict]) -> list[str]:
    """The last gate decision on this version and the paired difference it rested on."""
    decided = [
        e for e in events if e.get("action") in ("promote", "reject") and e["version"] == version
    ]
    if not decided:
        return ["Not yet decided by the gate."]
    e = decided[-1]
    verdict = "promoted to champion" if e["action"] == "promote" else "kept as challenger"
    lines = [f"- {e['at']}: **{verdict}** by {e.get('by', '?')}: {e.get('reason', '')}"]
    if e.get("from_champion") and e.get("mean_diff") is not None:
        metric = e.get("metric", "iw_nll")
        lines.append(
            f"- Paired on the same test images against v{e['from_champion']}: mean difference "
            f"{metric} (candidate - champion) {e['mean_diff']:+.4g} nats/example, bootstrap "
            f"upper bound {e['upper_bound']:+.4g} at confidence {e.get('confidence')} (lower "
            "is better; promoted only when the bound is below minus the margin, "
            "promotion.min_improvement_nats: docs/registry.md)."
        )
    pinned = e.get("pinned")
    if pinned and pinned.get("mean_diff") is not None:
        lines.append(
            f"- On the champion's own test data (data version {pinned['data_version']}, "
            f"{pinned['examples']} images): mean difference {pinned['mean_diff']:+.4g}, upper "
            f"bound {pinned['upper_bound']:+.4g}."
        )
    return lines


def _aliases(mv, version: str, events: list[dict]) -> list[str]:
    held = ", ".join(f"`{a}`" for a in sorted(mv.aliases or [])) or "none"
    lines = [f"Aliases now: {held}."]
    for e in events:
        if e.get("action") != "rollback" or version not in (e["version"], e.get("from_champion")):
            continue
        if e["version"] == version:
            moved = f"restored as champion, replacing v{e.get('from_champion')}"
        else:
            moved = f"rolled back: champion moved to v{e['version']}"
        lines.append(f"- {e['at']}: {moved}, by {e.get('by', '?')}: {e.get('reason', '')}")
    return lines


def model_card(client: MlflowClient, name: str, version: str) -> str:
    """The version's card as Markdown (what `write_card` puts in its description)."""
    mv = model_version(client, name, version)
    version = str(mv.version)
    tags = dict(mv.tags or {})
    run = client.get_run(mv.run_id)
    events = history(client, name)
    params = run.data.params
    test_version = tags.get("test_data_version", "?")
    lines = [
        f"## {name} v{version}",
        "",
        "### Test metrics",
        f"On test data version `{test_version}`, {tags.get('n_examples', '?')} images, "
        f"{tags.get('likelihood', '?')} likelihood, binarize `{tags.get('binarize', '?')}`, "
        f"eval seed {tags.get('eval_seed', '?')}; every term in nats per example.",
        "",
        *_metrics(run, tags),
        "",
        "### Data",
        f"Trained on data version `{tags.get('data_version', '?')}` (DVC; "
        f"remote {tags.get('data_remote', '?')}); splits {tags.get(SPLIT_SIZES_TAG, '?')}.",
        "",
        "### Gate",
        *_gate(name, version, events),
        "",
        *_aliases(mv, version, events),
        "",
        "### Training",
        "| setting | value |",
        "|---|---|",
        *(f"| {key} | {params[key]} |" for key in TRAINING if key in params),
        "",
        f"Code: git `{tags.get('git_commit', '?')}`, params hash `{tags.get('params_hash', '?')}`; "
        f"`vae-pipeline lineage {version}` prints the commands that rebuild it.",
        "",
        "### Pictures",
        f"In the run's artifacts (run `{mv.run_id}`, folder `reports/`): "
        + ", ".join(f"`runs:/{mv.run_id}/reports/{p}`" for p in PICTURES)
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write_card(client: MlflowClient, name: str, version: str) -> None:
    """Put the card in the version's description. A card that cannot be written is a warning:
    the registration or alias move it describes has happened and stays."""
    try:
        client.update_model_version(
            name, str(version), description=model_card(client, name, version)
        )
    except Exception as exc:  # noqa: BLE001 - the card describes; it never undoes a move
        log.warning("could not write the model card of %s v%s: %s", name, version, exc)
