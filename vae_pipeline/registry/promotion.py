"""Promotion and rollback: the gate applied under the promotion lock, floors, the alias moves
and their record."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.registry import gate
from vae_pipeline.registry.card import write_card
from vae_pipeline.registry.evidence import Evidence, per_example
from vae_pipeline.registry.history import event_side, history, record_event, utc_now
from vae_pipeline.registry.lock import (
    PromotionError,
    promotion_lock,
)
from vae_pipeline.registry.pinned import pinned_config, tested_on
from vae_pipeline.registry.versions import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    alias_version,
    champion,
    current_eval_key,
    current_uses_key,
    default_actor,
    model_version,
)
from vae_pipeline.tracking import client_for

log = logging.getLogger(__name__)

# The history's actions that move the champion alias ("reject" moves challenger).
CHAMPION_MOVES = ("promote", "rollback")


@dataclass(frozen=True)
class Decision(gate.GateResult):
    """The gate's result for one registered candidate, and what it was compared with."""

    candidate_version: str = ""
    champion_version: str | None = None
    champion_evidence: str | None = None  # "stored" or "re-evaluated"
    unchanged: bool = False  # the candidate was the champion already: nothing was moved
    # the gate on the champion's own test data, for a candidate tested on other data
    pinned: dict | None = None


def promote_if_better(
    cfg: Config,
    uri: str,
    version: str,
    workdir: Path = Path("."),
    actor: str | None = None,
) -> Decision:
    """Apply the gate to registered `version` and move the aliases; records the move.

    The evidence (possibly a re-evaluation) is gathered without the lock; under the lock the
    champion is read again and, if another promotion moved it meanwhile, the evidence is
    gathered again for the new champion.
    """
    name = cfg.registry.model_name
    client = client_for(uri)
    actor = actor or default_actor()
    candidate = _evaluated_candidate(client, name, version)
    key, ukey = _pairing_keys(cfg, workdir, candidate.tags or {})
    cand = per_example(cfg, uri, candidate, workdir, key, ukey)
    for _attempt in range(5):
        incumbent = champion(client, name)
        if incumbent is not None and str(incumbent.version) == str(version):
            return Decision(
                False,
                "already champion: no alias moved",
                float(cand.values.mean()),
                candidate_version=str(version),
                champion_version=str(version),
                unchanged=True,
            )
        champ = pinned = None  # the champion's evidence: none to compare with when nats differ
        if incumbent is not None and not _likelihoods_differ(candidate, incumbent):
            champ = per_example(cfg, uri, incumbent, workdir, key, ukey)
            pinned = _pinned_evidence(cfg, uri, client, workdir, candidate, incumbent)
        with promotion_lock(client, name, cfg, actor) as lock:
            now = champion(client, name)
            if (now and str(now.version)) != (incumbent and str(incumbent.version)):
                log.info("the champion moved while gathering evidence; gathering it again")
                continue
            decision = _decide(cfg, version, candidate, incumbent, cand, champ)
            if pinned is not None:
                decision = _with_pinned(cfg, decision, cand, pinned)
            lock.check()  # still ours: not broken as stale while the gate ran
            _apply(client, name, cfg, decision, candidate, incumbent, actor)
            return decision
    raise PromotionError(f"the {name} champion kept moving during promotion of v{version}; retry")


@dataclass(frozen=True)
class Pinned:
    """Both sides on the champion's test data (`registry.pinned`)."""

    data_version: str
    candidate: Evidence
    champion: Evidence


def _pinned_evidence(cfg: Config, uri: str, client, workdir: Path, candidate, incumbent):
    """For a candidate tested on other data than the champion (a retrain on new data): both
    on the champion's test data version, rebuilt from DVC when the workspace holds other
    data; None when both were tested on the same data, or the workspace's test split is the
    champion's (the pairing on it is then the whole comparison)."""
    if tested_on(candidate) == tested_on(incumbent):
        return None
    pinned_cfg = pinned_config(cfg, client, incumbent, workdir)
    if pinned_cfg is None:
        return None
    key = current_eval_key(pinned_cfg, workdir)
    champ = per_example(pinned_cfg, uri, incumbent, workdir, key)
    cand = per_example(pinned_cfg, uri, candidate, workdir, key)
    return Pinned(tested_on(incumbent), cand, champ)


def _with_pinned(cfg: Config, decision: Decision, cand: Evidence, pinned: Pinned) -> Decision:
    """The rule for a candidate tested on other data: promoted only when the gate passes on
    the new data's test split (`decision`) and on the champion's test data; both reported."""
    on_pinned = gate.decide(
        pinned.candidate.values, pinned.champion.values, cand.active_units, cfg.promotion
    )
    new = f"the new data's test split ({len(cand.values)} images)"
    old = (
        f"v{decision.champion_version}'s test data (data version {pinned.data_version}, "
        f"{len(pinned.champion.values)} images)"
    )
    if decision.promoted and not on_pinned.promoted:
        reason = f"not better on {old}: {on_pinned.reason} (on {new}: {decision.reason})"
    else:
        reason = f"on {new}: {decision.reason}; on {old}: {on_pinned.reason}"
    record = {
        **asdict(on_pinned),
        "data_version": pinned.data_version,
        "examples": len(pinned.champion.values),
        "champion_evidence": pinned.champion.source,
    }
    promoted = decision.promoted and on_pinned.promoted
    return replace(decision, promoted=promoted, reason=reason, pinned=record)


def _evaluated_candidate(client, name: str, version: str):
    """The registered version to gate: one vae-pipeline evaluated (it has an eval_key tag)."""
    candidate = model_version(client, name, version)
    if "eval_key" not in (candidate.tags or {}):
        raise PromotionError(
            f"{name} v{version} carries no evaluation tags (eval_key): it was not registered by "
            "vae-pipeline; evaluate and register it with `vae-pipeline register`"
        )
    return candidate


def _pairing_keys(cfg: Config, workdir: Path, ctags: dict) -> tuple[str, str | None]:
    """The evaluation (and, with promotion.floors, the uses) both sides are compared on.

    Pair on the evaluation this config would run now, on this workdir's test split; a
    candidate evaluated otherwise is re-evaluated too. Without prepared data, its own.
    """
    key = current_eval_key(cfg, workdir) or ctags["eval_key"]
    ukey = (
        (current_uses_key(cfg, workdir) or ctags.get("uses_key")) if cfg.promotion.floors else None
    )
    return key, ukey


def _decide(cfg: Config, version: str, candidate, incumbent, cand, champ) -> Decision:
    """The gate (and floors) on the gathered evidence: `champ` is the incumbent's, None when
    there is no champion or the likelihoods differ. Reads nothing from the registry."""
    if incumbent is not None and _likelihoods_differ(candidate, incumbent):
        result = gate.GateResult(
            False,
            f"likelihoods differ (candidate {_likelihood(candidate)}, champion "
            f"v{incumbent.version} {_likelihood(incumbent)}): their nats are not "
            "comparable; to switch anyway: vae-pipeline rollback --to "
            f"{version} --reason ...",
            float(cand.values.mean()),
        )
    else:
        champ_values = None if champ is None else champ.values
        result = gate.decide(cand.values, champ_values, cand.active_units, cfg.promotion)
        if result.promoted and champ is not None:
            result = _with_floors(cfg, result, cand.uses, champ.uses, champ.active_units)
    return Decision(
        **asdict(result),
        candidate_version=str(version),
        champion_version=None if incumbent is None else str(incumbent.version),
        champion_evidence=None if champ is None else champ.source,
    )


def _with_floors(
    cfg: Config,
    result: gate.GateResult,
    cand_uses: dict[str, float] | None,
    champ_uses: dict[str, float] | None,
    champ_active: int,
) -> gate.GateResult:
    """The gate's result with promotion.floors applied (they can only block a promotion).
    Floors protect a champion's uses only while the champion itself passes the posterior
    collapse guard: a collapsed champion (rolled back to, or promoted under a lower
    min_active_units) cannot hold a better model out through them."""
    if cfg.promotion.floors and champ_active < cfg.promotion.min_active_units:
        return replace(
            result,
            reason=f"{result.reason}; floors not applied: the champion fails the posterior "
            f"collapse guard ({champ_active} active units < promotion.min_active_units="
            f"{cfg.promotion.min_active_units}), so its uses are not protected",
        )
    passed, notes = gate.check_floors(
        cand_uses or {}, champ_uses or {}, cfg.promotion, cfg.probe.labels_per_class
    )
    if not notes:
        return result
    if passed:
        return replace(result, reason=f"{result.reason}; floors: {'; '.join(notes)}")
    failed = [n for n in notes if "> promotion.floors." in n]
    return replace(
        result,
        promoted=False,
        reason=f"floor not met: {'; '.join(failed)} (though {result.reason})",
    )


def _likelihood(mv) -> str:
    """The version's p(x|z); versions registered before the tag existed are Bernoulli."""
    return (mv.tags or {}).get("likelihood", "bernoulli")


def _likelihoods_differ(candidate, incumbent) -> bool:
    """Their nats are not comparable: the gate cannot pair them."""
    return _likelihood(incumbent) != _likelihood(candidate)


def _apply(client, name, cfg: Config, d: Decision, candidate, incumbent, actor: str) -> None:
    metric = cfg.promotion.metric
    held = alias_version(client, name, CHALLENGER)
    before = alias_version(client, name, PREVIOUS)
    # the versions whose cards change: the candidate, and those whose aliases move
    touched = {d.candidate_version} | {str(v.version) for v in (incumbent, held, before) if v}
    if d.promoted:
        client.set_registered_model_alias(name, CHAMPION, d.candidate_version)
        if incumbent is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(incumbent.version))
        if held is not None and str(held.version) == d.candidate_version:
            client.delete_registered_model_alias(name, CHALLENGER)
        alias = CHAMPION
    else:
        client.set_registered_model_alias(name, CHALLENGER, d.candidate_version)
        alias = CHALLENGER
    client.set_model_version_tag(
        name, d.candidate_version, "gate_decision", "promoted" if d.promoted else "rejected"
    )
    client.set_model_version_tag(name, d.candidate_version, "gate_reason", d.reason)
    record_event(
        client,
        name,
        {
            "action": "promote" if d.promoted else "reject",
            "alias": alias,
            "version": d.candidate_version,
            "from_champion": d.champion_version,
            "by": actor,
            "reason": d.reason,
            "metric": metric,
            "candidate": event_side(candidate, metric, d.candidate_value),
            "champion": event_side(incumbent, metric, d.champion_value),
            "mean_diff": d.mean_diff,
            "upper_bound": d.upper_bound,
            "confidence": cfg.promotion.confidence,
            **({"pinned": d.pinned} if d.pinned else {}),
        },
    )
    for version in sorted(touched):
        write_card(client, name, version)
    log.info(
        "gate: %s v%s %s (%s)",
        name,
        d.candidate_version,
        "-> champion" if d.promoted else "stays challenger",
        d.reason,
    )


def rollback(
    cfg: Config, uri: str, reason: str, to_version: str | None = None, actor: str | None = None
) -> dict:
    """Move `champion` back to `previous-champion` (or to `to_version`); recorded in history.

    Afterwards `previous-champion` is, for a plain rollback, the champion that preceded the
    restored one in the history (so repeated rollbacks walk back), or none; for `to_version`, the
    champion it replaced (so a plain rollback undoes it). A restored challenger loses that alias.
    """
    name = cfg.registry.model_name
    client = client_for(uri)
    actor = actor or default_actor()
    if not reason.strip():
        raise PromotionError("rollback needs a --reason: it is recorded in the history")
    with promotion_lock(client, name, cfg, actor) as lock:
        current, target = _rollback_sides(client, name, to_version)
        before = _previous_after_rollback(client, name, current, target, to_version)
        lock.check()
        previous = alias_version(client, name, PREVIOUS)
        _restore(client, name, current, target, before)
        metric = cfg.promotion.metric
        event = record_event(
            client,
            name,
            {
                "action": "rollback",
                "alias": CHAMPION,
                "version": str(target.version),
                "from_champion": str(current.version),
                "by": actor,
                "reason": reason,
                "metric": metric,
                "candidate": event_side(target, metric),
                "champion": event_side(current, metric),
            },
        )
        touched = {str(target.version), str(current.version), before}
        touched.add(None if previous is None else str(previous.version))
        for version in sorted(v for v in touched if v):
            write_card(client, name, version)
        return event


def _rollback_sides(client, name: str, to_version: str | None) -> tuple:
    """(the current champion, the version to restore): previous-champion, or `to_version`."""
    current = champion(client, name)
    if current is None:
        raise PromotionError(f"{name} has no champion to roll back")
    if to_version is None:
        target = alias_version(client, name, PREVIOUS)
        if target is None:
            raise PromotionError(
                f"{name} has no previous-champion alias; pass --to VERSION to choose one"
            )
    else:
        target = model_version(client, name, to_version)
    if str(target.version) == str(current.version):
        raise PromotionError(f"{name} v{target.version} is already the champion")
    return current, target


def _previous_after_rollback(
    client, name: str, current, target, to_version: str | None
) -> str | None:
    """The version previous-champion names once `target` is restored (None: no alias)."""
    if to_version is not None:
        # A chosen version: the champion it replaces is the one to come back to.
        return str(current.version)
    # Walking back: what preceded the restored champion, per the history: the champion that
    # the last move of `champion` onto it (a promotion or a rollback) replaced.
    for event in reversed(history(client, name)):
        moved = event.get("action") in CHAMPION_MOVES and event.get("alias") == CHAMPION
        if moved and event.get("version") == str(target.version):
            return event.get("from_champion")
    return None


def _restore(client, name: str, current, target, before: str | None) -> None:
    """The rollback's alias moves (champion, previous-champion, a restored challenger's alias)
    and the rolled_back_at tag on the champion it replaces."""
    client.set_registered_model_alias(name, CHAMPION, str(target.version))
    if before and before != str(target.version):
        client.set_registered_model_alias(name, PREVIOUS, before)
    elif alias_version(client, name, PREVIOUS) is not None:
        client.delete_registered_model_alias(name, PREVIOUS)
    held = alias_version(client, name, CHALLENGER)
    if held is not None and str(held.version) == str(target.version):
        client.delete_registered_model_alias(name, CHALLENGER)
    client.set_model_version_tag(name, str(current.version), "rolled_back_at", utc_now())


def decision_dict(decision: Decision) -> dict:
    return asdict(decision)
