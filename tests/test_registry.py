"""Registration, the gate through MLflow, aliases, history, rollback and the lock, on the real
embedded SQLite store (the HTTP server case is in test_registry_server.py)."""

import threading
import time

import pytest
import torch

from vae_pipeline.lineage import version_lineage
from vae_pipeline.registry.history import history
from vae_pipeline.registry.lock import (
    LOCK_SUFFIX,
    PromotionError,
    break_stale,
    lock_entries,
    promotion_lock,
)
from vae_pipeline.registry.promotion import promote_if_better, rollback
from vae_pipeline.registry.versions import alias_version, register
from vae_pipeline.tracking import client_for

from .registry_helpers import NAME, add_version, evidence, registry_cfg


@pytest.fixture
def store(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, client_for(uri)


def _alias(client, alias):
    mv = alias_version(client, NAME, alias)
    return None if mv is None else str(mv.version)


def test_promote_reject_rollback_and_the_history(store, tmp_path):
    uri, client = store
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1))
    v2 = add_version(client, evidence(2, shift=-1.0))  # 1 nat better on every image
    v3 = add_version(client, evidence(3, shift=+0.5))  # worse
    v4 = add_version(client, evidence(4, shift=-5.0), active_units=0)  # "better" but collapsed

    first = promote_if_better(cfg, uri, v1, tmp_path, actor="tester")
    assert first.promoted and first.reason == "no champion yet"
    second = promote_if_better(cfg, uri, v2, tmp_path, actor="tester")
    assert second.promoted and second.champion_version == v1 and second.upper_bound < 0
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v2, v1)
    third = promote_if_better(cfg, uri, v3, tmp_path, actor="tester")
    assert not third.promoted and third.reason.startswith("not better")
    fourth = promote_if_better(cfg, uri, v4, tmp_path, actor="tester")
    assert not fourth.promoted and "posterior collapse guard" in fourth.reason
    assert (_alias(client, "champion"), _alias(client, "challenger")) == (v2, v4)
    assert client.get_model_version(NAME, v3).tags["gate_decision"] == "rejected"
    assert client.get_model_version(NAME, v2).tags["gate_decision"] == "promoted"

    event = rollback(cfg, uri, "v2 breaks a consumer", actor="oncall")
    assert (event["from_champion"], event["version"]) == (v2, v1)
    assert _alias(client, "champion") == v1
    assert _alias(client, "previous-champion") is None  # v1 had no champion before it
    assert "rolled_back_at" in client.get_model_version(NAME, v2).tags
    with pytest.raises(PromotionError, match="no previous-champion alias; pass --to VERSION"):
        rollback(cfg, uri, "again", actor="oncall")
    rollback(cfg, uri, "consumer fixed", to_version=v2, actor="oncall")
    # A chosen version: the champion it replaced is the one a plain rollback returns to.
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v2, v1)
    rollback(cfg, uri, "try the challenger", to_version=v4, actor="oncall")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v4, v2)
    assert _alias(client, "challenger") is None  # v4 is the champion now, not a challenger
    rollback(cfg, uri, "undo", actor="oncall")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v2, v1)

    events = history(client, NAME)
    assert [(e["seq"], e["action"], e["version"], e["from_champion"]) for e in events] == [
        (1, "promote", v1, None),
        (2, "promote", v2, v1),
        (3, "reject", v3, v2),
        (4, "reject", v4, v2),
        (5, "rollback", v1, v2),
        (6, "rollback", v2, v1),
        (7, "rollback", v4, v2),
        (8, "rollback", v2, v4),
    ]
    assert events[1]["by"] == "tester" and events[4]["by"] == "oncall"
    assert events[4]["reason"] == "v2 breaks a consumer"
    # Metrics on both sides are recorded with each move.
    assert events[1]["candidate"]["iw_nll"] == pytest.approx(evidence(2, shift=-1.0).mean())
    assert events[1]["champion"]["iw_nll"] == pytest.approx(evidence(1).mean())
    assert events[1]["upper_bound"] == pytest.approx(second.upper_bound)


def test_previous_champion_is_derived_from_every_alias_move(store, tmp_path):
    """champion v1 -> rollback (v2) -> rollback --to v4 -> promote v1 -> rollback: back on v4,
    the champion before it is v2 (the rollback that last put v4 there replaced v2), not v3 (the
    promotion that first did)."""
    uri, client = store
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1, shift=-3.0))
    v2 = add_version(client, evidence(2, shift=-2.0))
    v3 = add_version(client, evidence(3))
    v4 = add_version(client, evidence(4, shift=-1.0))
    for version in (v3, v4, v2, v1):  # each better than the last
        assert promote_if_better(cfg, uri, version, tmp_path).promoted
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v1, v2)
    rollback(cfg, uri, "v1 breaks a consumer")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v2, v4)
    rollback(cfg, uri, "try v4", to_version=v4)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v4, v2)
    assert promote_if_better(cfg, uri, v1, tmp_path).promoted
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v1, v4)
    rollback(cfg, uri, "v1 again")
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v4, v2)


def test_promoting_the_champion_again_says_nothing_moved(store, tmp_path):
    uri, client = store
    v1 = add_version(client, evidence(1))
    assert promote_if_better(registry_cfg(uri), uri, v1, tmp_path).promoted
    again = promote_if_better(registry_cfg(uri), uri, v1, tmp_path)
    assert not again.promoted and again.unchanged and again.reason.startswith("already champion")
    assert _alias(client, "champion") == v1 and len(history(client, NAME)) == 1


def test_promoting_a_former_challenger_clears_that_alias(store, tmp_path):
    uri, client = store
    v1 = add_version(client, evidence(1))
    v2 = add_version(client, evidence(2, shift=-1.0))
    promote_if_better(registry_cfg(uri), uri, v1, tmp_path)
    # With a demanding margin v2 is rejected; with the default it is promoted.
    demanding = registry_cfg(uri, min_improvement_nats=3.0)
    assert not promote_if_better(demanding, uri, v2, tmp_path).promoted
    assert _alias(client, "challenger") == v2
    assert promote_if_better(registry_cfg(uri), uri, v2, tmp_path).promoted
    assert _alias(client, "champion") == v2 and _alias(client, "challenger") is None


def test_a_version_without_evaluation_tags_is_refused_and_nothing_moves(store, tmp_path):
    uri, client = store
    v1 = add_version(client, evidence(1))
    promote_if_better(registry_cfg(uri), uri, v1, tmp_path)
    bare = client.create_model_version(NAME, source="file:///nowhere/model").version
    with pytest.raises(PromotionError, match="carries no evaluation tags"):
        promote_if_better(registry_cfg(uri), uri, str(bare), tmp_path)
    assert _alias(client, "champion") == v1 and len(history(client, NAME)) == 1


def test_register_is_idempotent_by_run_id(store, tmp_path):
    uri, client = store
    v1 = add_version(client, evidence(1))
    run_id = client.get_model_version(NAME, v1).run_id
    again = register(uri, NAME, f"runs:/{run_id}/model", run_id, {"k": "v"})
    assert again == v1
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1


def test_the_lock_excludes_a_second_promoter_then_times_out(store):
    uri, client = store
    cfg = registry_cfg(uri, lock_timeout_s=0.5)
    with promotion_lock(client, NAME, cfg, "first"):
        started = time.monotonic()
        with (
            pytest.raises(
                PromotionError, match=r"\(by first\) has held the lock 'conv-vae--pro"
            ) as err,
            promotion_lock(client, NAME, cfg, "second"),
        ):
            pass
        assert time.monotonic() - started >= 0.5
        # the holding time is the holder's, the waiting time the setting's
        assert "waited promotion.lock_timeout_s=0.5 s for it" in str(err.value)
    with promotion_lock(client, NAME, cfg, "second"):  # released: free again
        pass
    assert lock_entries(client, NAME) == []  # released: nothing left in the registry


def test_a_waiting_promoter_gets_the_lock_when_it_is_released(store):
    uri, client = store
    cfg = registry_cfg(uri, lock_timeout_s=30)
    order = []
    inside = threading.Event()

    def holder():
        with promotion_lock(client_for(uri), NAME, cfg, "holder"):
            inside.set()
            time.sleep(1.0)
            order.append("holder done")

    thread = threading.Thread(target=holder)
    thread.start()
    inside.wait(10)
    with promotion_lock(client, NAME, cfg, "waiter"):
        order.append("waiter in")
    thread.join()
    assert order == ["holder done", "waiter in"]


def test_an_abandoned_lock_is_broken_after_lock_stale_s(store):
    uri, client = store
    dead = NAME + LOCK_SUFFIX + "--deadbeef"
    client.create_registered_model(dead, tags={"owner": "a dead process"})
    time.sleep(1.2)
    cfg = registry_cfg(uri, lock_timeout_s=5, lock_stale_s=1.0)
    with promotion_lock(client, NAME, cfg, "new owner") as lock:
        held = lock_entries(client, NAME)
        assert [(m.name, m.tags["owner"]) for m in held] == [(lock.entry, "new owner")]
        lock.check()
    assert lock_entries(client, NAME) == []


def test_a_stale_lock_is_reported_broken_once_however_many_meet_it(store, caplog):
    uri, client = store
    dead = NAME + LOCK_SUFFIX + "--deadbeef"
    client.create_registered_model(dead, tags={"owner": "a dead process"})
    entry = lock_entries(client, NAME)[0]
    with caplog.at_level("WARNING", logger="vae_pipeline.registry.lock"):
        # two promoters that listed the same stale entry: only the one that removed it says so
        assert break_stale(client, entry, 99.0) is True
        assert break_stale(client_for(uri), entry, 99.0) is False
    broken = [r for r in caplog.records if "breaking a promotion lock" in r.getMessage()]
    assert len(broken) == 1 and "a dead process" in broken[0].getMessage()
    assert lock_entries(client, NAME) == []


def test_a_holder_whose_lock_was_broken_as_stale_changes_nothing(store, tmp_path):
    """A promoter that outlives promotion.lock_stale_s loses the lock to a waiter; before it
    moves an alias it finds that out and stops."""
    uri, client = store
    cfg = registry_cfg(uri, lock_timeout_s=5, lock_stale_s=0.5)
    with promotion_lock(client, NAME, cfg, "slow") as slow:
        time.sleep(0.7)
        with promotion_lock(client, NAME, cfg, "waiter") as waiter:
            waiter.check()
            with pytest.raises(PromotionError, match="was broken while held"):
                slow.check()


def _breaking_the_lock_after(monkeypatch, uri, function_name):
    """Wrap promotion.`function_name` (run under the lock, before any alias moves) so that the
    holder's lock entry is broken as stale by another promoter before it returns."""
    from vae_pipeline.registry import promotion

    real = getattr(promotion, function_name)
    broken = []

    def then_break(*args, **kwargs):
        result = real(*args, **kwargs)
        other = client_for(uri)  # the promoter that found the holder's entry stale
        held = lock_entries(other, NAME)
        assert len(held) == 1  # the holder's own entry
        assert break_stale(other, held[0], 99.0)
        broken.append(held[0].name)
        return result

    monkeypatch.setattr(promotion, function_name, then_break)
    return broken


def test_a_promotion_whose_lock_was_broken_while_gating_moves_nothing(store, tmp_path, monkeypatch):
    uri, client = store
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1))
    v2 = add_version(client, evidence(2, shift=-1.0))  # better: the gate would promote it
    assert promote_if_better(cfg, uri, v1, tmp_path).promoted
    broken = _breaking_the_lock_after(monkeypatch, uri, "_decide")
    with pytest.raises(PromotionError, match="was broken while held") as err:
        promote_if_better(cfg, uri, v2, tmp_path)
    assert broken and repr(broken[0]) in str(err.value)
    aliases = [_alias(client, a) for a in ("champion", "previous-champion", "challenger")]
    assert aliases == [v1, None, None]
    assert "gate_decision" not in client.get_model_version(NAME, v2).tags
    assert [(e["action"], e["version"]) for e in history(client, NAME)] == [("promote", v1)]
    assert lock_entries(client, NAME) == []


def test_a_rollback_whose_lock_was_broken_while_reading_the_history_moves_nothing(
    store, tmp_path, monkeypatch
):
    uri, client = store
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1))
    v2 = add_version(client, evidence(2, shift=-1.0))
    for version in (v1, v2):
        assert promote_if_better(cfg, uri, version, tmp_path).promoted
    broken = _breaking_the_lock_after(monkeypatch, uri, "_previous_after_rollback")
    with pytest.raises(PromotionError, match="was broken while held") as err:
        rollback(cfg, uri, "v2 breaks a consumer")
    assert broken and repr(broken[0]) in str(err.value)
    assert (_alias(client, "champion"), _alias(client, "previous-champion")) == (v2, v1)
    assert "rolled_back_at" not in client.get_model_version(NAME, v2).tags
    assert [e["action"] for e in history(client, NAME)] == ["promote", "promote"]
    assert lock_entries(client, NAME) == []


def test_using_a_store_does_not_change_which_store_the_config_resolves(tmp_path, monkeypatch):
    from vae_pipeline.config import build_config
    from vae_pipeline.config.environment import tracking_uri

    from .conftest import tiny_params

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config(tiny_params())
    client_for(f"sqlite:///{tmp_path}/other.db")  # MLflow itself would export this URI
    assert tracking_uri(cfg, tmp_path / "ws") == f"sqlite:///{tmp_path}/ws/mlflow.db"


def test_lineage_gives_the_checkout_and_warns_about_uncommitted_changes(store):
    uri, client = store
    v1 = add_version(client, evidence(1))
    client.set_model_version_tag(NAME, v1, "git_commit", "0123abcd-dirty")
    client.set_model_version_tag(NAME, v1, "data_version", "feedbeef")
    info = version_lineage(client, NAME, v1)
    assert info["reproduce"][:2] == [
        "git checkout 0123abcd",
        "# trained with uncommitted changes: the checkout may differ",
    ]
    # made without lineage artifacts (as versions registered before them): the commit's params
    assert info["reproduce"][2].startswith("# registered before lineage was recorded")
    assert info["reproduce"][3].startswith("dvc pull") and "feedbeef" in info["reproduce"][3]
    assert info["tags"]["eval_key"] and info["run_id"] == client.get_model_version(NAME, v1).run_id


def test_a_candidate_with_another_likelihood_is_never_compared(store, tmp_path):
    uri, client = store
    cfg = registry_cfg(uri)
    v1 = add_version(client, evidence(1))  # registered before the likelihood tag: Bernoulli
    assert promote_if_better(cfg, uri, v1, tmp_path).promoted
    # Gaussian densities on [0, 1] pixels are far "better" in nats, and mean nothing next to
    # Bernoulli NLLs: the gate refuses to compare them and says how to switch by hand.
    v2 = add_version(client, evidence(2, shift=-400.0), likelihood="gaussian")
    decision = promote_if_better(cfg, uri, v2, tmp_path)
    assert not decision.promoted
    assert "likelihoods differ (candidate gaussian, champion v1 bernoulli)" in decision.reason
    assert f"rollback --to {v2}" in decision.reason
    assert (_alias(client, "champion"), _alias(client, "challenger")) == (v1, v2)
    # The same likelihood on both sides is compared as usual.
    v3 = add_version(client, evidence(3, shift=-1.0), likelihood="bernoulli")
    assert promote_if_better(cfg, uri, v3, tmp_path).promoted


def test_floors_block_a_better_nll_that_costs_too_much_auroc(store, tmp_path):
    uri, client = store
    floors = {"anomaly_auroc": 0.01, "sample_fd": 5.0}
    cfg = registry_cfg(uri, floors=floors)
    v1 = add_version(client, evidence(1), uses={"anomaly_auroc": 0.90, "sample_fd": 40.0})
    assert promote_if_better(cfg, uri, v1, tmp_path).promoted
    # 1 nat better per image, but AUROC 0.05 lower: held back, and the reason says why.
    v2 = add_version(
        client, evidence(2, shift=-1.0), uses={"anomaly_auroc": 0.85, "sample_fd": 30.0}
    )
    blocked = promote_if_better(cfg, uri, v2, tmp_path)
    assert not blocked.promoted
    assert blocked.reason.startswith("floor not met: anomaly_auroc 0.85 vs champion 0.9: worse")
    assert "promotion.floors.anomaly_auroc=0.01" in blocked.reason and "better:" in blocked.reason
    assert (_alias(client, "champion"), _alias(client, "challenger")) == (v1, v2)
    assert client.get_model_version(NAME, v2).tags["gate_decision"] == "rejected"
    # Within the allowed worsening (0.005 < 0.01; sample_fd 4 higher < 5): promoted.
    v3 = add_version(
        client, evidence(3, shift=-1.0), uses={"anomaly_auroc": 0.895, "sample_fd": 44.0}
    )
    passed = promote_if_better(cfg, uri, v3, tmp_path)
    assert passed.promoted and "floors: anomaly_auroc 0.895 vs champion 0.9" in passed.reason
    # Trained without another class: not comparable, so not blocking, and the champion is not
    # re-evaluated to find that out (these versions have no weights: it would fail).
    v4 = add_version(
        client, evidence(4, shift=-2.0), uses={"anomaly_auroc": 0.5}, uses_key="holdout=Coat|x"
    )
    other = promote_if_better(cfg, uri, v4, tmp_path)
    assert other.promoted and other.champion_evidence == "stored"
    assert "anomaly_auroc not compared (the champion has no value measured alike)" in other.reason


def test_floors_re_measure_a_champion_measured_with_other_settings(bagless, registered):
    """Real models: the champion's stored uses were measured with other probe settings, so
    both sides are re-measured on this workspace's test split before the floors compare."""
    import shutil

    from vae_pipeline import pipeline, tracking
    from vae_pipeline.config.environment import tracking_uri
    from vae_pipeline.data.dataset import PreparedSplit
    from vae_pipeline.evaluate.downstream import measure_uses
    from vae_pipeline.evaluate.estimator import per_example_terms
    from vae_pipeline.train.checkpoint import load_model
    from vae_pipeline.train.trainer import Trainer

    ws, cfg, model, _ = bagless
    uri = tracking_uri(cfg, ws)
    champion_version = registered.rsplit("/", 1)[1]
    # A better candidate: two more epochs from the same checkpoint, evaluated on its own.
    shutil.copytree(ws / "models", ws / "models6")
    longer = cfg.model_copy(
        update={
            "train": cfg.train.model_copy(update={"epochs": 5}),
            "evaluate": cfg.evaluate.model_copy(update={"reports_dir": "reports6"}),
        }
    )
    Trainer(longer, ws / "models6", workdir=ws).fit()
    metrics = pipeline.evaluate_model(longer, "models6", ws)
    run_id = tracking.start_run(longer, uri, ws, "longer", {})
    candidate = pipeline.register(longer, run_id, ws / "models6" / "model.pt", metrics, ws)
    tracking.finish_run(uri, run_id)

    gate_cfg = cfg.model_copy(
        update={
            # Not what either stored (and cheaper than the fixture's settings).
            "probe": cfg.probe.model_copy(update={"labels_per_class": [10], "draws": 1}),
            "generation": cfg.generation.model_copy(update={"fd_images": 200}),
            "promotion": cfg.promotion.model_copy(
                update={"floors": {"anomaly_auroc": 1.0, "sample_fd": 1000.0}}
            ),
        }
    )
    assert promote_if_better(gate_cfg, uri, champion_version, ws).promoted
    decision = promote_if_better(gate_cfg, uri, candidate, ws)
    assert decision.promoted and decision.champion_evidence == "re-evaluated", decision.reason
    # The floors compared freshly measured values: the same as measuring each model here.
    test = PreparedSplit(ws / cfg.data.prepared_dir, "test")
    images = test.tensor()
    fresh = {}
    for name, m in (("candidate", load_model(ws / "models6" / "model.pt")[0]), ("champion", model)):
        terms = per_example_terms(m, images, gate_cfg.evaluate, torch.device("cpu"))
        fresh[name] = measure_uses(gate_cfg, m, test, images, terms, ws, torch.device("cpu"))
    auroc = f"anomaly_auroc {fresh['candidate']['anomaly_auroc']:.4g} vs champion "
    auroc += f"{fresh['champion']['anomaly_auroc']:.4g}"
    assert auroc in decision.reason
    assert f"sample_fd {fresh['candidate']['sample_fd']:.4g} vs champion" in decision.reason


def test_test_helpers_keep_artifacts_beside_the_store_not_in_the_working_folder(
    tmp_path, monkeypatch
):
    """The suite runs in the project folder: a version made there must not leave ./mlruns."""
    cwd = tmp_path / "project"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    (tmp_path / "store").mkdir()
    client = client_for(uri)
    version = add_version(client, evidence(1))
    run_id = client.get_model_version(NAME, version).run_id
    assert list(cwd.iterdir()) == []
    assert client.get_run(run_id).info.artifact_uri.startswith((tmp_path / "store").as_uri())
    assert (tmp_path / "store").joinpath("gate-artifacts").is_dir()


def test_a_collapsed_champion_cannot_hold_a_better_model_out_through_the_floors(store, tmp_path):
    uri, client = store
    floors = {"probe_latent_acc_n10": 0.02}
    # A collapsed champion (0 active units), as a rollback or a looser guard leaves one.
    v1 = add_version(client, evidence(1), active_units=0, uses={"probe_latent_acc_n10": 0.70})
    assert promote_if_better(registry_cfg(uri, min_active_units=0), uri, v1, tmp_path).promoted
    cfg = registry_cfg(uri, floors=floors, min_active_units=1)
    uses = {"probe_latent_acc_n10": 0.65}  # worse by 0.05 > 0.02
    v2 = add_version(client, evidence(2, shift=-200.0), active_units=8, uses=uses)
    decision = promote_if_better(cfg, uri, v2, tmp_path)
    assert decision.promoted and decision.reason.startswith("better:")
    assert "floors not applied: the champion fails the posterior collapse guard (0 active" in (
        decision.reason
    )
    assert _alias(client, "champion") == v2
    # A healthy champion keeps its floors: the same worsening is held back.
    v3 = add_version(
        client, evidence(3, shift=-205.0), active_units=8, uses={"probe_latent_acc_n10": 0.60}
    )
    blocked = promote_if_better(cfg, uri, v3, tmp_path)
    assert not blocked.promoted and blocked.reason.startswith("floor not met")


@pytest.mark.slow
def test_eight_promoters_meeting_a_stale_lock_never_hold_it_together(tmp_path):
    from .lock_stress import overlaps, trials

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client_for(uri)  # the store's tables exist before the workers meet it
    for held in trials(uri, n_trials=5):
        intervals = [h for h in held if isinstance(h, tuple)]
        assert len(intervals) == 8, held  # each one got it, in turn, within lock_timeout_s
        assert overlaps(intervals) == []
