"""Model registry: registration with lineage, the promotion gate, aliases, their history, rollback.

Aliases on the registered model (`registry.model_name`):
  champion           what consumers load (models:/conv-vae@champion)
  challenger         the latest candidate the gate did not promote
  previous-champion  the champion before the current one (what `rollback` returns to)

The rule is in `vae_pipeline.gate`. The evidence is per-example test metrics of candidate and
champion on the same evaluation (test data version, K, binarization, seed): each registered
version's run holds `reports/per_example_<metric>.npy`; a champion evaluated otherwise is
re-evaluated on the candidate's test split first.

Every alias move is appended to the registered model's tags (`history.000001`, ... as JSON):
who, when, why, and the metrics on both sides; `history()` reads them back. Moves are serialised
by a lock held in the registry itself (`vae_pipeline.promotion_lock`), so two flows finishing
together cannot both win or leave the aliases inconsistent, whether on SQLite or a shared server.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import socket
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vae_pipeline import gate
from vae_pipeline.config import Config
from vae_pipeline.data.dataset import PreparedSplit, resolve_label
from vae_pipeline.data.errors import DataError
from vae_pipeline.evaluate import (
    EVAL_PROTOCOL,
    METRIC_KEYS,
    measure_uses,
    per_example_metrics,
    per_example_terms,
    summarize,
    uses_key,
)
from vae_pipeline.promotion_lock import (  # noqa: F401 (re-exported: registry.promotion_lock)
    LOCK_SUFFIX,
    PromotionError,
    lock_entries,
    promotion_lock,
)
from vae_pipeline.tracking import client_for, download_weights
from vae_pipeline.train.checkpoint import load_model

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
HISTORY_PREFIX = "history."
PER_EXAMPLE = "reports/per_example_{metric}.npy"


# --- registration ------------------------------------------------------------------------------


def eval_key(metrics: dict) -> str:
    """What must match for two evaluations to be paired example by example."""
    m = metrics
    return (
        f"data={m.get('data_version')}|K={m.get('iw_k')}|binarize={m.get('binarize')}"
        f"|seed={m.get('eval_seed')}|n={m.get('n_examples')}|protocol={m.get('eval_protocol')}"
    )


def current_eval_key(cfg: Config, workdir: Path) -> str | None:
    """The eval_key an evaluation with `cfg` would get on the prepared test split (None when
    there is no prepared test split in `workdir`)."""
    try:
        test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    except (OSError, ValueError, DataError):
        return None
    return eval_key(
        {
            "data_version": test.manifest.get("data_version", "unversioned"),
            "iw_k": cfg.evaluate.iw_samples,
            "binarize": cfg.evaluate.binarize,
            "eval_seed": cfg.evaluate.seed,
            "n_examples": len(test),
            "eval_protocol": EVAL_PROTOCOL,
        }
    )


def version_tags(metrics: dict) -> dict[str, str]:
    """Evaluation tags of a model version: metrics, the evaluation's settings, its key."""
    tags = {key: repr(float(metrics[key])) for key in METRIC_KEYS if key in metrics}
    if "active_units" in metrics:
        tags["active_units"] = str(int(metrics["active_units"]))
    tags["elbo_nll"] = repr(-float(metrics["elbo"]))
    tags["test_data_version"] = str(metrics.get("data_version"))
    for key in ("iw_k", "binarize", "likelihood", "eval_seed", "n_examples", "eval_protocol"):
        tags[key] = str(metrics.get(key))
    tags["eval_key"] = eval_key(metrics)
    for key, value in metrics.items():  # the uses' metrics, for promotion.floors
        if key.startswith(USE_METRIC_PREFIXES) and _is_number(value):
            tags[key] = repr(float(value))
    for key in ("uses_key", "holdout_class", "anomaly_score"):
        if key in metrics:
            tags[key] = str(metrics[key])
    return tags


USE_METRIC_PREFIXES = ("anomaly_", "probe_", "sample_fd")


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def current_uses_key(cfg: Config, workdir: Path) -> str | None:
    """The uses_key an evaluation with `cfg` would get here (None without prepared data)."""
    try:
        test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
        names = list(test.manifest.get("label_names") or [])
        holdout = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
    except (OSError, ValueError, DataError):
        return None
    return uses_key(cfg, None if holdout is None else names[holdout])


def stored_uses(tags: dict[str, str], key: str | None) -> dict[str, float] | None:
    """A version's uses metrics from its tags, when measured as `key` says (else None)."""
    if key is None or tags.get("uses_key") != key:
        return None
    out = {}
    for name, value in tags.items():
        if name.startswith(USE_METRIC_PREFIXES):
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out


def version_of_run(uri: str, name: str, run_id: str) -> str | None:
    """The version of `name` that run `run_id` registered, if any."""
    try:
        found = client_for(uri).search_model_versions(f"name='{name}' and run_id='{run_id}'")
    except MlflowException:
        return None
    return str(found[0].version) if found else None


def register(uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Create a model version (or return the one this run already registered: idempotent)."""
    version = version_of_run(uri, name, run_id)
    if version is not None:
        log.info("run %s already registered as %s v%s", run_id, name, version)
    else:
        version = mlflow.register_model(
            model_uri, name, tags={k: str(v) for k, v in tags.items()}
        ).version
        log.info("registered %s version %s", name, version)
    return str(version)


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def champion(client: MlflowClient, name: str):
    return alias_version(client, name, CHAMPION)


# --- evidence ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Evidence:
    values: np.ndarray  # the per-example promotion metric, in test-split order
    active_units: int
    source: str  # "stored" or "re-evaluated"
    uses: dict[str, float] | None = None  # the uses' metrics, when asked for and comparable


def per_example(
    cfg: Config, uri: str, mv, workdir: Path, key: str, ukey: str | None = None
) -> Evidence:
    """The evidence for model version `mv` on the evaluation `key`: its run's stored values
    when it was evaluated that way, else a fresh evaluation of its weights on the prepared test
    split in `workdir`. With `ukey` (promotion.floors are set) its uses' metrics too, measured
    as `ukey` says: stored, or re-measured (not for a model trained without another class)."""
    tags = mv.tags or {}
    metric = cfg.promotion.metric
    uses = stored_uses(tags, ukey)
    # A version tagged as trained without another class cannot be compared on the uses: no
    # re-evaluation for them (versions from before the tag are re-measured to find out).
    wanted = None if ukey is None else ukey.split("|", 1)[0].removeprefix("holdout=")
    other_class = "holdout_class" in tags and tags["holdout_class"] != wanted
    comparable = ukey is None or uses is not None or other_class
    if tags.get("eval_key") == key and mv.run_id and comparable:
        try:
            local = mlflow.artifacts.download_artifacts(
                run_id=mv.run_id,
                artifact_path=PER_EXAMPLE.format(metric=metric),
                dst_path=tempfile.mkdtemp(prefix="vae-gate-"),
                tracking_uri=uri,
            )
            stored = np.load(local)
            return Evidence(stored, int(float(tags.get("active_units", 0))), "stored", uses)
        except (MlflowException, OSError) as exc:
            log.warning("v%s: stored per-example values unavailable (%s)", mv.version, exc)
    log.info(
        "%s v%s was evaluated as %s (uses %s); re-evaluating it as %s (uses %s)",
        mv.name,
        mv.version,
        tags.get("eval_key"),
        tags.get("uses_key"),
        key,
        ukey,
    )
    model, meta = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
    test = PreparedSplit(workdir / cfg.data.prepared_dir, "test")
    images = test.tensor()
    device = torch.device("cpu")
    terms = per_example_terms(model, images, cfg.evaluate, device)
    summary = summarize(terms, cfg.evaluate, model.pixel_count(), model.likelihood)
    uses = None
    if ukey is not None:
        names = list(test.manifest.get("label_names") or [])
        held = resolve_label(cfg.anomaly.holdout_class, names, "anomaly.holdout_class")
        if meta.get("holdout_class") == (None if held is None else names[held]):
            uses = measure_uses(cfg, model, test, images, terms, workdir, device)
        else:
            log.info(
                "v%s was trained without class %s, not %s: its uses are not compared",
                mv.version,
                meta.get("holdout_class"),
                cfg.anomaly.holdout_class,
            )
    values = per_example_metrics(terms)[metric]
    return Evidence(values, int(summary["active_units"]), "re-evaluated", uses)


# --- the lock ----------------------------------------------------------------------------------


def _actor() -> str:
    with contextlib.suppress(Exception):
        return f"{getpass.getuser()}@{socket.gethostname()}"
    return "unknown"


def _get_registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException:
        return None


# --- history -----------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def history(client: MlflowClient, name: str) -> list[dict]:
    """Every alias move on `name`, oldest first."""
    model = _get_registered_model(client, name)
    if model is None:
        return []
    tags = model.tags or {}
    return [json.loads(tags[k]) for k in sorted(tags) if k.startswith(HISTORY_PREFIX)]


def _record(client: MlflowClient, name: str, event: dict) -> dict:
    """Append an event (call with the lock held: the sequence number is read, then written)."""
    seq = max((int(e.get("seq", 0)) for e in history(client, name)), default=0) + 1
    event = {"seq": seq, "at": _now(), **event}
    client.set_registered_model_tag(name, f"{HISTORY_PREFIX}{seq:06d}", json.dumps(event))
    return event


def _side(mv, metric: str, value: float | None = None) -> dict | None:
    if mv is None:
        return None
    tags = mv.tags or {}
    side = {"version": str(mv.version), "run_id": mv.run_id}
    for key in (metric, "active_units", "test_data_version"):
        if key in tags:
            side[key] = tags[key]
    if value is not None:
        side[metric] = value
    return side


# --- promotion ---------------------------------------------------------------------------------


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
    actor = actor or _actor()
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
    _record(
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
            "candidate": _side(candidate, metric, d.candidate_value),
            "champion": _side(incumbent, metric, d.champion_value),
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
    actor = actor or _actor()
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
        client.set_model_version_tag(name, str(current.version), "rolled_back_at", _now())
        metric = cfg.promotion.metric
        return _record(
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
                "candidate": _side(target, metric),
                "champion": _side(current, metric),
            },
        )


def decision_dict(decision: Decision) -> dict:
    return asdict(decision)


# --- lineage -----------------------------------------------------------------------------------


def lineage(client: MlflowClient, name: str, version: str) -> dict:
    """A version's lineage tags, aliases and the commands that reproduce it
    (`vae_pipeline.lineage`)."""
    from vae_pipeline.lineage import reproduce

    mv = client.get_model_version(name, str(version))
    tags = dict(mv.tags or {})
    return {
        "name": name,
        "version": str(mv.version),
        "aliases": list(mv.aliases or []),
        "run_id": mv.run_id,
        "source": mv.source,
        "tags": tags,
        "reproduce": reproduce(client, name, str(mv.version), tags, mv.run_id),
    }
