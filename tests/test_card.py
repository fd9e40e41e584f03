"""The model card in each version's registry description: written at registration and rewritten
by the gate and by a rollback, from what the registry holds (real SQLite store)."""

from vae_pipeline.registry.card import model_card, write_card
from vae_pipeline.registry.promotion import promote_if_better, rollback
from vae_pipeline.tracking import client_for

from .registry_helpers import NAME, add_version, evidence, registry_cfg


def _card(client, version: str) -> str:
    return client.get_model_version(NAME, version).description


def test_the_card_follows_the_gate_and_a_rollback(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1))
    v2 = add_version(client, evidence(2, shift=-1.0))  # better on every image
    v3 = add_version(client, evidence(3, shift=+0.5))  # worse
    run = client.get_model_version(NAME, v2).run_id
    client.log_metric(run, "test_iw_nll", 299.123456)
    client.log_metric(run, "test_active_units", 7.0)
    client.log_param(run, "train.epochs", "3")
    client.set_model_version_tag(NAME, v2, "iw_k", "64")
    client.set_model_version_tag(NAME, v2, "split_sizes", "train 10, val 2, test 400")
    write_card(client, NAME, v2)  # as pipeline.register does
    card = _card(client, v2)
    assert card.startswith(f"## {NAME} v{v2}") and "Not yet decided by the gate." in card
    assert "| IW NLL (K=64) | 299.1 | nats/example |" in card
    assert "| active units | 7 | units |" in card and "| train.epochs | 3 |" in card
    assert "splits train 10, val 2, test 400" in card
    assert f"runs:/{run}/reports/recon.png" in card

    promote_if_better(cfg, uri, v1, tmp_path, actor="tester")
    assert "**promoted to champion** by tester: no champion yet" in _card(client, v1)
    second = promote_if_better(cfg, uri, v2, tmp_path, actor="tester")
    card = _card(client, v2)
    assert "**promoted to champion** by tester" in card and "Aliases now: `champion`." in card
    assert (
        f"against v{v1}: mean difference iw_nll (candidate - champion) "
        f"{second.mean_diff:+.4g} nats/example, bootstrap upper bound {second.upper_bound:+.4g}"
    ) in card
    assert "Aliases now: `previous-champion`." in _card(client, v1)  # its aliases moved too
    promote_if_better(cfg, uri, v3, tmp_path, actor="tester")
    assert "**kept as challenger**" in _card(client, v3) and "`challenger`" in _card(client, v3)
    v4 = add_version(client, evidence(4, shift=-2.0))  # better than v2
    promote_if_better(cfg, uri, v4, tmp_path, actor="tester")
    assert "Aliases now: none." in _card(client, v1)  # previous-champion moved on to v2
    assert "Aliases now: `previous-champion`." in _card(client, v2)
    rollback(cfg, uri, "v4 breaks a consumer", actor="oncall")  # back to v2

    rollback(cfg, uri, "v2 breaks a consumer", actor="oncall")  # back to v1
    restored, replaced = _card(client, v1), _card(client, v2)
    assert "Aliases now: `champion`." in restored
    assert f"restored as champion, replacing v{v2}, by oncall: v2 breaks a consumer" in restored
    assert "Aliases now: none." in replaced
    assert f"rolled back: champion moved to v{v1}, by oncall: v2 breaks a consumer" in replaced
    assert "**promoted to champion**" in replaced  # the gate's decision stays on the card
    assert _card(client, v1) == model_card(client, NAME, v1)  # written from the registry


def test_a_card_that_cannot_be_written_is_a_warning_and_changes_nothing(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = client_for(uri)
    v1 = add_version(client, evidence(1))
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        write_card(client, NAME, "99")  # no such version
    assert "could not write the model card of conv-vae v99" in caplog.text
    assert not client.get_model_version(NAME, v1).description
