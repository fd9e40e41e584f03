"""Promotion and rollback: the gate applied under the promotion lock, floors, the alias moves
and their record."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vae_pipeline.config import Config
from vae_pipeline.registry import gate
from vae_pipeline.registry.evidence import per_example
from vae_pipeline.registry.history import event_side, history, record_event, utc_now
from vae_pipeline.registry.lock import (
    PromotionError,
    promotion_lock,
)
from vae_pipeline.registry.versions import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    alias_version,
    champion,
    current_eval_key,
    current_uses_key,
    default_actor,
)
from vae_pipeline.tracking import client_for

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decision(gate.GateResult):
    """The gate's result for one registered candidate, and what it was compared with."""

    candidate_version: str = ""
    champion_version: str | None = None
    champion_evidence: str | None = None  # "stored" or "re-evaluated"


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
    candidate = client.get_model_version(name, str(version))
    ctags = candidate.tags or {}
    if "eval_key" not in ctags:
        raise PromotionError(
            f"{name} v{version} carries no evaluation tags (eval_key): it was not registered by "
            "vae-pipeline; evaluate and register it with `vae-pipeline register`"
        )
    # Pair on the evaluation this config would run now, on this workdir's test split; a
    # candidate evaluated otherwise is re-evaluated too. Without prepared data, its own.
    key = current_eval_key(cfg, workdir) or ctags["eval_key"]
    ukey = (
        (current_uses_key(cfg, workdir) or ctags.get("uses_key")) if cfg.promotion.floors else None
    )
    cand = per_example(cfg, uri, candidate, workdir, key, ukey)
    cand_values, cand_active = cand.values, cand.active_units
    for _attempt in range(5):
        incumbent = champion(client, name)
        if incumbent is not None and str(incumbent.version) == str(version):
            return Decision(
                True, "already champion", float(cand_values.mean()), candidate_version=str(version)
            )
        champ, champ_values, source = None, None, None
        mismatch = incumbent is not None and _likelihood(incumbent) != _likelihood(candidate)
        if incumbent is not None and not mismatch:
            champ = per_example(cfg, uri, incumbent, workdir, key, ukey)
            champ_values, source = champ.values, champ.source
        with promotion_lock(client, name, cfg, actor) as lock:
            now = champion(client, name)
            if (now and str(now.version)) != (incumbent and str(incumbent.version)):
                log.info("the champion moved while gathering evidence; gathering it again")
                continue
            if mismatch:
                result = gate.GateResult(
                    False,
                    f"likelihoods differ (candidate {_likelihood(candidate)}, champion "
                    f"v{incumbent.version} {_likelihood(incumbent)}): their nats are not "
                    "comparable; to switch anyway: vae-pipeline rollback --to "
                    f"{version} --reason ...",
                    float(cand_values.mean()),
                )
            else:
                result = gate.decide(cand_values, champ_values, cand_active, cfg.promotion)
                if result.promoted and champ is not None:
                    result = _with_floors(cfg, result, cand.uses, champ.uses, champ.active_units)
            decision = Decision(
                **asdict(result),
                candidate_version=str(version),
                champion_version=None if incumbent is None else str(incumbent.version),
                champion_evidence=source,
            )
            lock.check()  # still ours: not broken as stale while the gate ran
            _apply(client, name, cfg, decision, candidate, incumbent, actor)
            return decision
    raise PromotionError(f"the {name} champion kept moving during promotion of v{version}; retry")


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


def _apply(client, name, cfg: Config, d: Decision, candidate, incumbent, actor: str) -> None:
    metric = cfg.promotion.metric
    if d.promoted:
        client.set_registered_model_alias(name, CHAMPION, d.candidate_version)
        if incumbent is not None:
            client.set_registered_model_alias(name, PREVIOUS, str(incumbent.version))
        held = alias_version(client, name, CHALLENGER)
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
        },
    )
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
            target = client.get_model_version(name, str(to_version))
        if str(target.version) == str(current.version):
            raise PromotionError(f"{name} v{target.version} is already the champion")
        if to_version is not None:
            # A chosen version: the champion it replaces is the one to come back to.
            before = str(current.version)
        else:
            # Walking back: what preceded the restored champion, per the history.
            before = None
            for event in reversed(history(client, name)):
                if event.get("action") == "promote" and event.get("version") == str(target.version):
                    before = event.get("from_champion")
                    break
        lock.check()
        client.set_registered_model_alias(name, CHAMPION, str(target.version))
        if before and before != str(target.version):
            client.set_registered_model_alias(name, PREVIOUS, before)
        elif alias_version(client, name, PREVIOUS) is not None:
            client.delete_registered_model_alias(name, PREVIOUS)
        held = alias_version(client, name, CHALLENGER)
        if held is not None and str(held.version) == str(target.version):
            client.delete_registered_model_alias(name, CHALLENGER)
        client.set_model_version_tag(name, str(current.version), "rolled_back_at", utc_now())
        metric = cfg.promotion.metric
        return record_event(
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


def decision_dict(decision: Decision) -> dict:
    return asdict(decision)
