"""The `retrain` Prefect flow: version data -> prepare -> train -> evaluate -> register -> promote.

Each task is a thin wrapper over `vae_pipeline.pipeline`. Runs without a Prefect server
(ephemeral) unless PREFECT_API_URL points at one; `vae-pipeline deploy` makes it a scheduled
deployment (prefect.yaml).

Behaviour (orchestration.* in params.yaml):
- Steps that touch the network (MLflow, the DVC remote, S3) retry with exponential backoff;
  bad input or a state a person must fix (a UserError, vae_pipeline.errors) and training
  are never retried.
- Every step has a time limit; at training's, torchrun and its ranks are stopped.
- prepare, the MLflow run, training, evaluation and the gate's decision are cached under the
  retrain's identity (workdir, data version, training params, code), with results persisted
  in PREFECT_HOME: a re-run after a failure reuses what finished and resumes the rest
  (training from its checkpoint). A retrain of unchanged inputs does no work; `force=True`
  redoes it.
- Training holds a Prefect global concurrency limit (orchestration.train_lock), so two
  retrains never train on the same GPUs at once.
- The run publishes a Markdown artifact `retrain-summary` (data version, metrics, the gate's
  decision, step timings, MLflow links); a failed run publishes `retrain-failure` naming the
  step and the reason (flows/summary.py writes both summaries). A failure never moves the
  champion alias.

    vae-pipeline retrain --set train.epochs=1
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect.tasks import exponential_backoff

from flows.summary import format_summary, summary_artifact, workspace_note
from vae_pipeline import pipeline, tracking, versioning
from vae_pipeline.config import Config, load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.errors import PipelineError, is_permanent
from vae_pipeline.evaluate.report import summary_markdown
from vae_pipeline.registry.promotion import decision_dict
from vae_pipeline.registry.versions import champion

EVALUATION_ARTIFACT = "evaluation-summary"
SUMMARY_ARTIFACT = "retrain-summary"
FAILURE_ARTIFACT = "retrain-failure"
CODE_VERSION = versioning.code_version(Path(__file__).parent)


def _cache_on(*names: str) -> Callable[[Any, dict], str]:
    """A cache key from the task's name and the named (string) parameters."""

    def key(context, parameters: dict) -> str:
        return _hash(context.task.name, *(str(parameters[n]) for n in names))

    return key


def is_transient(task, task_run, state) -> bool:
    """retry_condition_fn, the pipeline's one rule (vae_pipeline.errors): bad input or a state
    only a person can fix (a UserError) is never retried; anything else is."""
    exc = state.result(raise_on_failure=False)
    return not is_permanent(exc)


def retry_options(cfg: Config) -> dict:
    """Retries with exponential backoff (jittered) for a step that touches the network."""
    o = cfg.orchestration
    if not o.retries:
        return {}
    return {
        "retries": o.retries,
        "retry_delay_seconds": exponential_backoff(o.retry_delay_s)(o.retries),
        "retry_jitter_factor": 0.2,
        "retry_condition_fn": is_transient,
    }


# Persisted results (in PREFECT_HOME) are JSON: paths, dicts and strings, not pickles.
CACHED = {"persist_result": True, "result_serializer": "json"}


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(cfg: Config, workdir: Path) -> None:
    tracking.preflight(tracking_uri(cfg, workdir))


@task(name="version-data", cache_policy=NO_CACHE)
def version_data(cfg: Config, workdir: Path) -> str:
    return pipeline.ingest(cfg, workdir)


@task(name="prepare", cache_key_fn=_cache_on("key"), **CACHED)
def prepare(cfg: Config, workdir: Path, key: str) -> dict:
    return pipeline.prepare_data(cfg, workdir)


@task(name="open-mlflow-run", cache_key_fn=_cache_on("key"), **CACHED)
def open_run(cfg: Config, workdir: Path, data_version: str, key: str) -> str:
    tags = {
        "data_version": data_version,
        "git_commit": versioning.git_commit(workdir),
        "params_hash": cfg.params_hash(),
        "retrain_key": key,
        "flow_run_id": str(flow_run.id or ""),
    }
    name = f"retrain-{time.strftime('%Y%m%d-%H%M%S')}"
    return tracking.start_run(cfg, tracking_uri(cfg, workdir), workdir, name, tags)


def train_lock_name(cfg: Config) -> str:
    return cfg.orchestration.train_lock.replace("{host}", socket.gethostname())


@task(name="train", cache_key_fn=_cache_on("key", "run_id"), **CACHED)
def train(cfg: Config, workdir: Path, out_dir: Path, run_id: str, key: str) -> Path:
    from prefect.concurrency.sync import concurrency

    lock = train_lock_name(cfg)
    ensure_concurrency_limit(lock, cfg.orchestration.train_lock_slots)
    get_run_logger().info("training under global concurrency limit %r (waits while full)", lock)
    with concurrency(lock, occupy=1, strict=True):
        return pipeline.train(cfg, workdir, out_dir, run_id)


def ensure_concurrency_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit if it does not exist (its slots are left alone
    when it does: an operator may have changed them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            # ObjectAlreadyExists: a concurrent retrain created it meanwhile
            with contextlib.suppress(ObjectAlreadyExists):
                client.create_global_concurrency_limit(
                    GlobalConcurrencyLimitCreate(name=name, limit=slots)
                )


@task(name="evaluate", cache_key_fn=_cache_on("key", "run_id"), **CACHED)
def evaluate(cfg: Config, workdir: Path, out_dir: Path, run_id: str, key: str) -> dict:
    """Evaluate; the metrics table (reports/summary.md) becomes the run's Markdown artifact."""
    metrics = pipeline.evaluate_model(cfg, str(out_dir), workdir)
    create_markdown_artifact(
        key=EVALUATION_ARTIFACT,
        markdown=f"# {cfg.registry.model_name}: test evaluation\n\n{summary_markdown(metrics)}",
        description="ELBO components, IW NLL, bits/dim, I(x;z), active units, with stderrs",
    )
    return metrics


@task(name="register", cache_policy=NO_CACHE)
def register(cfg: Config, workdir: Path, run_id: str, weights: Path, metrics: dict) -> str:
    """Idempotent without a cache: a run's model is registered once (MLflow is the record)."""
    return pipeline.register(
        cfg, run_id, weights, metrics, workdir, {"flow_run_id": str(flow_run.id or "")}
    )


@task(name="promote", cache_key_fn=_cache_on("version", "champion", "gate"), **CACHED)
def promote_version(cfg: Config, workdir: Path, version: str, champion: str, gate: str) -> dict:
    """Cached on (version, the champion it faces, the gate's settings): a re-run facing the
    same champion reuses the decision instead of recording it twice."""
    actor = f"prefect flow run {flow_run.id}" if flow_run.id else None
    return decision_dict(pipeline.promote(cfg, version, workdir, actor))


class RetrainFailed(PipelineError):
    """A retrain step failed; names the step, the reason and the (untouched) champion. The
    step's own error, with its traceback when it is not the pipeline's, is in the flow's log."""

    def __init__(self, step: str, reason: str, champion: str):
        super().__init__(f"step {step!r} failed: {reason}; {champion}")
        self.step, self.reason, self.champion = step, reason, champion


class Steps:
    """Runs the flow's tasks with their configured retries/timeouts, times each, and
    re-runs a cached step whose outputs are gone from disk."""

    def __init__(self, cfg: Config, force: bool):
        self.cfg, self.force = cfg, force
        self.current = "start"
        self.timings: list[tuple[str, float, str]] = []  # (step, seconds, final state name)

    def options(self, t, network: bool) -> dict:
        o = self.cfg.orchestration
        timeout = o.train_timeout_s if t.name == "train" else o.step_timeout_s
        opts: dict[str, Any] = {"timeout_seconds": timeout}
        if network:
            opts |= retry_options(self.cfg)
        if self.force and t.cache_key_fn is not None:
            opts["refresh_cache"] = True
        return opts

    def run(self, t, *args, network: bool = False, valid: Callable[[Any], bool] | None = None):
        self.current = t.name
        start = time.perf_counter()
        configured = t.with_options(**self.options(t, network))
        state = configured(*args, return_state=True)
        result = state.result()  # raises the step's exception when it failed
        if state.name == "Cached" and valid is not None and not valid(result):
            get_run_logger().warning("%s: cached result's files are gone; running it again", t.name)
            state = configured.with_options(refresh_cache=True)(*args, return_state=True)
            result = state.result()
        self.timings.append((t.name, time.perf_counter() - start, state.name))
        return result


def _champion_line(cfg: Config, uri: str) -> str:
    try:
        mv = champion(tracking.client_for(uri), cfg.registry.model_name)
    except Exception as exc:  # the registry itself may be what failed
        return f"champion unknown (registry unreachable: {exc})"
    if mv is None:
        return f"{cfg.registry.model_name} has no champion (none was set)"
    return f"champion {cfg.registry.model_name} v{mv.version} untouched"


def report_failure(flow, flow_run_, state) -> None:
    """on_failure hook: a Markdown artifact and an error line naming the step and why."""
    exc = state.result(raise_on_failure=False)
    logger = get_run_logger()
    if isinstance(exc, RetrainFailed):
        step, reason, champion = exc.step, exc.reason, exc.champion
    else:  # failed outside a step (e.g. the flow's parameters)
        step, reason, champion = "flow", state.message or repr(exc), "champion untouched"
    logger.error("retrain failed at step %r: %s (%s)", step, reason, champion)
    create_markdown_artifact(
        key=FAILURE_ARTIFACT,
        markdown=(
            f"# retrain failed at step `{step}`\n\n"
            f"**Why:** {reason}\n\n**Registry:** {champion}.\n\n"
            "A re-run with the same inputs reuses the steps that finished (cached) and "
            "resumes training from its last checkpoint.\n"
        ),
        description=f"retrain failed at {step}",
    )


def _prepared_matches(cfg: Config, root: Path, data_version: str) -> Callable[[dict], bool]:
    def check(manifest: dict) -> bool:
        path = root / cfg.data.prepared_dir / "manifest.json"
        if not path.is_file():
            return False
        on_disk = json.loads(path.read_text())
        return on_disk.get("data_version") == data_version and on_disk == manifest

    return check


def _metrics_match(cfg: Config, root: Path) -> Callable[[dict], bool]:
    def check(metrics: dict) -> bool:
        path = root / cfg.evaluate.reports_dir / "metrics.json"
        return path.is_file() and json.loads(path.read_text()) == metrics

    return check


@flow(name="retrain", on_failure=[report_failure])
def retrain(
    params: str = "params.yaml",
    overrides: list[str] | None = None,
    workdir: str = ".",
    source: str | None = None,
    promote: bool | None = None,
    force: bool = False,
) -> dict:
    """Retrain the ConvVAE on the current data and promote it if it is better.

    Args:
        params: params file, relative to `workdir`.
        overrides: `section.key=value` overrides, as `--set` takes them.
        workdir: the project (DVC repo) folder.
        source: a data source for this run (data.source otherwise).
        promote: run the promotion gate (promotion.enabled otherwise).
        force: redo every step even when a retrain of the same inputs finished before.
    """
    root = Path(workdir).resolve()
    cfg = _flow_config(root / params, overrides, source, promote)
    uri = tracking_uri(cfg, root)
    steps = Steps(cfg, force)
    run_id = None
    try:
        data_version, key = _version_and_prepare(steps, cfg, root)
        # The run lives in one tracking store: the same work against another store is new.
        run_key = _hash(key, uri, cfg.registry.experiment)
        run_id = steps.run(open_run, cfg, root, data_version, run_key, network=True)
        tracking.reopen_run(uri, run_id)
        version, metrics = _train_and_register(steps, cfg, root, run_id, key)
        decision = _gate(steps, cfg, root, uri, version) if cfg.promotion.enabled else None
        tracking.finish_run(uri, run_id)
    except Exception as exc:
        if run_id is not None:
            _quietly(tracking.finish_run, uri, run_id, "FAILED")
        champion_note = (
            "champion untouched (the registry was not reached)"
            if steps.current == "preflight"
            else _champion_line(cfg, uri)
        )
        raise RetrainFailed(steps.current, _reason(exc), champion_note) from exc
    summary = {
        "flow_run_id": str(flow_run.id or ""),
        "data_version": data_version,
        "run_id": run_id,
        "model_version": version,
        "metrics": {
            k: metrics[k] for k in ("elbo", "recon", "kl", "iw_nll", "bits_per_dim", "active_units")
        },
        "decision": decision,
        "workspace_note": workspace_note(cfg, uri, data_version, decision),
        "steps": [{"step": s, "seconds": round(t, 3), "state": n} for s, t, n in steps.timings],
        "links": tracking.ui_links(uri, run_id, cfg.registry.model_name, version),
    }
    _publish_summary(cfg, summary, version)
    return summary


def _flow_config(
    params: Path, overrides: list[str] | None, source: str | None, promote: bool | None
) -> Config:
    """The retrain's config: the params file and overrides, then the flow's own parameters."""
    cfg = load_config(params, overrides or [])
    if source:  # an empty one (an event without a source, flows/events.py): data.source
        cfg.data.source = source
    if promote is not None:
        cfg.promotion.enabled = promote
    return cfg


def _version_and_prepare(steps: Steps, cfg: Config, root: Path) -> tuple[str, str]:
    """The preflight, version-data and prepare steps; returns (data version, retrain key)."""
    steps.run(preflight, cfg, root, network=True)  # a dead MLflow fails before any work
    data_version = steps.run(version_data, cfg, root, network=True)
    key = versioning.retrain_key(cfg, data_version, root, CODE_VERSION)
    prepare_key = versioning.prepare_key(cfg, data_version, root, CODE_VERSION)
    steps.run(prepare, cfg, root, prepare_key, valid=_prepared_matches(cfg, root, data_version))
    return data_version, key


def _train_and_register(
    steps: Steps, cfg: Config, root: Path, run_id: str, key: str
) -> tuple[str, dict]:
    """The train, evaluate and register steps in the open run; returns (model version, metrics)."""
    out_dir = Path("runs") / run_id
    weights = steps.run(
        train, cfg, root, out_dir, run_id, key, valid=lambda w: (root / w).is_file()
    )
    metrics = steps.run(evaluate, cfg, root, out_dir, run_id, key, valid=_metrics_match(cfg, root))
    version = steps.run(register, cfg, root, run_id, weights, metrics, network=True)
    return version, metrics


def _gate(steps: Steps, cfg: Config, root: Path, uri: str, version: str) -> dict:
    """The promote step: the gate's decision on `version` against the champion it faces now."""
    steps.current = "promote"  # reading the champion is part of it
    incumbent = champion(tracking.client_for(uri), cfg.registry.model_name)
    settings = json.dumps(cfg.promotion.model_dump(mode="json"), sort_keys=True)
    gate = _hash(settings, uri, cfg.registry.model_name)
    incumbent_version = "none" if incumbent is None else str(incumbent.version)
    return steps.run(promote_version, cfg, root, version, incumbent_version, gate, network=True)


def _publish_summary(cfg: Config, summary: dict, version: str) -> None:
    """The retrain-summary artifact, and the same summary on stdout."""
    create_markdown_artifact(
        key=SUMMARY_ARTIFACT,
        markdown=summary_artifact(cfg, summary),
        description=f"{cfg.registry.model_name} v{version}: data, metrics, gate, timings",
    )
    print(format_summary(cfg, summary))


def _hash(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:20]


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if len(text) < 2000 else text[:2000] + " ..."


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception as exc:  # reporting must not hide the step's own error
        get_run_logger().warning("could not mark the MLflow run failed: %s", exc)
