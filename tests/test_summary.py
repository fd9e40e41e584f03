"""The retrain's summary: what it says about the workspace when the champion stays."""

from __future__ import annotations

from flows.summary import format_summary, workspace_note
from vae_pipeline.registry.promotion import promote_if_better
from vae_pipeline.tracking import client_for

from .registry_helpers import add_version, evidence, registry_cfg


def test_a_rejected_retrain_on_other_data_says_what_the_workspace_holds(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    cfg = registry_cfg(uri)
    promote_if_better(cfg, uri, add_version(client, evidence(1)), tmp_path)  # tested on "abc"
    rejected = {"promoted": False, "reason": "not better"}
    note = workspace_note(cfg, uri, "digits-version", rejected)
    assert "now hold data version digits-version" in note
    assert "champion v1 was tested on abc" in note and "lineage 1 --restore" in note
    # nothing to say: the champion moved, or the workspace holds the champion's test data
    assert workspace_note(cfg, uri, "digits-version", {**rejected, "promoted": True}) is None
    assert workspace_note(cfg, uri, "abc", rejected) is None
    assert workspace_note(cfg, uri, "digits-version", None) is None
    summary = {
        "model_version": "2",
        "run_id": "r",
        "data_version": "digits-version",
        "metrics": dict.fromkeys(("elbo", "recon", "kl", "iw_nll", "bits_per_dim"), 1.0)
        | {"active_units": 3},
        "decision": rejected,
        "workspace_note": note,
        "steps": [],
    }
    assert f"  NOTE: {note}" in format_summary(cfg, summary).splitlines()
