"""Precision, memory layout, compilation and Adam's kernel for the training step, chosen by
timing the candidates on this device, shape and batch (`train.* : auto`), or as forced.

Why measure: the best variant flips with the shape. On an H100 bf16 autocast + channels_last is
1.8x fp32 NCHW at 3x250x250 and 0.69x at 1x32x32, where the step is bound by kernel launches;
on a 2-core CPU channels_last ran 1.09-1.17x NCHW at 1x32x32. A rule cannot cover every
device and shape; a short probe can.

The probe runs once per (device, torch version, image shape, latent size, likelihood,
objective, micro-batch, accumulation) and its result is cached (`config.autotune_cache_path`),
so a training pays it once: about a second on CPU at the demo's shape, plus the compilations
on CUDA. Candidates, each built as the trainer builds its network (`build_network`: the same
graph, so the winner's compile is the trainer's cache entry) and running the trainer's
optimizer step on a random batch (the trainer's model and RNG states are untouched), timed
after a warm-up in interleaved rounds:
- CPU: NCHW vs channels_last, fp32 eager, and bf16 autocast where the processor has bf16 units
  (compile and fused Adam stay off unless forced: see config).
- CUDA: {fp32, bf16} x {NCHW, channels_last} eager with fused Adam; then the fastest of those
  compiled (and with CUDA graphs, "reduce-overhead", for one rank without gradient
  accumulation), and with the default Adam.
The fastest wins unless the plain variant (fp32, NCHW, eager) is within TIE of it: a choice
must pay for its complexity. Rank 0 decides and every rank takes its choice (they must run the
same graph); a resumed run keeps the plan of its checkpoint, so its bits stay reproducible,
when it still fits the device and world size it now runs on (else it is chosen anew).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import torch

from vae_pipeline.config import Config
from vae_pipeline.train.distributed import DistEnv, broadcast_object, patient_group
from vae_pipeline.train.step import (
    StepPlan,
    TrainingError,
    autocast_dtype,
    bf16_supported,
    build_network,
    micro_batches,
    plan_problems,
)

log = logging.getLogger(__name__)

TIE = 0.03  # the plain variant wins unless another is more than 3% faster
ROUNDS = 5  # interleaved timing rounds per candidate (median)
ROUND_SECONDS = 0.15  # target length of one round


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} cpu, {torch.get_num_threads()} threads"


def _choices(cfg: Config, device: torch.device, world_size: int) -> dict[str, list]:
    """Each setting's candidate values: the forced value alone, or what auto may pick here."""
    tc = cfg.train
    cuda = device.type == "cuda"
    autocast_dtype(tc.precision, device)  # refuses bf16 where it cannot run, naming the field
    if tc.precision != "auto":
        precision = [tc.precision]
    else:
        precision = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    layout = [False, True] if tc.channels_last == "auto" else [bool(tc.channels_last)]
    if tc.compile == "auto":
        # CUDA graphs only where they are safe: one rank, no gradient accumulation
        graphs = world_size == 1 and tc.grad_accum_steps == 1
        compile_ = ["none", "default"] + (["reduce-overhead"] if graphs else [])
        compile_ = compile_ if cuda else ["none"]
    elif tc.compile == "reduce-overhead":
        compile_ = ["reduce-overhead"]
    else:
        compile_ = ["default" if tc.compile else "none"]
    fused = ([True, False] if cuda else [False]) if tc.fused_adam == "auto" else [tc.fused_adam]
    if tc.compile == "reduce-overhead":
        graphs = StepPlan(compile="reduce-overhead")
        problems = plan_problems(graphs, device, world_size, tc.grad_accum_steps)
        if problems:
            raise TrainingError(
                f"train.compile=reduce-overhead: {'; '.join(problems)}; use train.compile=true "
                "or auto"
            )
    return {"precision": precision, "channels_last": layout, "compile": compile_, "fused": fused}


def cache_key(cfg: Config, device: torch.device, micro_batch: int, choices: dict) -> str:
    c = cfg.data
    k = cfg.train.iw_samples if cfg.train.objective == "iwae" else 1
    options = ";".join(f"{name}={values}" for name, values in sorted(choices.items()))
    return (
        f"{device_name(device)}|torch {torch.__version__}|{c.channels}x{c.image_size}x"
        f"{c.image_size}|latent {cfg.model.latent_dim}|{cfg.model.likelihood}|K {k}"
        f"|micro-batch {micro_batch}|accum {cfg.train.grad_accum_steps}|{options}"
    )


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: probe again, and rewrite it


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add one entry (atomically: a concurrent reader sees the old file or the new one)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        data = read_cache(path)
        data[key] = entry
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home is no reason to stop training
        log.warning("could not write the step-probe cache %s (%s)", path, exc)


class _Candidate:
    """One step variant on a fresh network built as the trainer builds it (`build_network`:
    the same graph, padding mask included, so the trainer's compile is the probe's cache
    entry), running the trainer's optimizer step: `accum` micro-batches, then Adam."""

    def __init__(
        self,
        cfg: Config,
        device: torch.device,
        plan: StepPlan,
        batch: tuple,
        content_box: list | None = None,
    ):
        self.plan, self.device = plan, device
        self.net = build_network(cfg, plan, device, DistEnv(), content_box)
        x, eps = batch
        self.accum = cfg.train.grad_accum_steps
        # the trainer's micro-batches: chunks of one rank's batch (the same shapes and strides,
        # so the same compiled graph)
        self.micro = micro_batches(
            x.contiguous(memory_format=self.net.memory_format), eps, self.accum
        )
        self.beta = torch.ones((), device=device)  # as the trainer passes it (iwae)

    def step(self) -> None:
        net = self.net
        net.optimizer.zero_grad(set_to_none=True)
        for x, eps in self.micro:
            if eps.dim() == 3:
                loss = -net.net(x, eps, self.beta)["iwae"].mean()
            else:
                loss = -net.net(x, eps)["elbo"].mean()
            (loss / self.accum).backward()
        net.optimizer.step()

    def time(self, steps: int) -> float:
        """Micro-batch images per second over `steps` optimizer steps (synchronised on CUDA)."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        images = sum(len(x) for x, _ in self.micro)
        return steps * images / (time.perf_counter() - t0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_batch(cfg: Config, device: torch.device, micro_batch: int) -> tuple:
    """A random rank batch of `grad_accum_steps` micro-batches, with its noise."""
    c, n = cfg.data, micro_batch * cfg.train.grad_accum_steps
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, c.channels, c.image_size, c.image_size), generator=gen)
    x = (x.float() / 255).to(device)
    k = cfg.train.iw_samples if cfg.train.objective == "iwae" else 1
    eps = torch.randn(k, n, cfg.model.latent_dim, generator=gen).to(device)
    return x, eps[0] if k == 1 else eps


WARMUP_STEPS = 3  # steps before timing: compilation, CUDA graph capture, allocator warm-up


def time_candidates(
    cfg: Config,
    device: torch.device,
    micro_batch: int,
    plans: list[StepPlan],
    rounds: int = ROUNDS,
    round_seconds: float = ROUND_SECONDS,
    content_box: list | None = None,
) -> dict[StepPlan, float]:
    """Median images/s of each plan over `rounds` interleaved rounds of ~`round_seconds`.

    A round's step count is sized from a step timed after the warm-up (so a compiled
    candidate's compile time does not shrink its rounds to one step)."""
    batch = _random_batch(cfg, device, micro_batch)
    built = []
    for plan in plans:
        try:
            cand = _Candidate(cfg, device, plan, batch, content_box)
            for _ in range(WARMUP_STEPS):  # warm-up (and compilation)
                cand.step()
            _sync(device)
            t0 = time.perf_counter()
            cand.step()
            _sync(device)
            built.append((cand, time.perf_counter() - t0))
        except Exception as exc:  # a variant that cannot run here is not a choice
            log.warning("step probe: %s failed (%s); left out", plan.label(), exc)
    steps = {id(c): max(1, int(round_seconds / max(dt, 1e-4))) for c, dt in built}
    rates: dict[StepPlan, list[float]] = {c.plan: [] for c, _ in built}
    for r in range(rounds):
        order = built if r % 2 == 0 else built[::-1]
        for cand, _ in order:
            rates[cand.plan].append(cand.time(steps[id(cand)]))
    return {plan: statistics.median(v) for plan, v in rates.items()}


def pick_plan(rates: dict[StepPlan, float]) -> tuple[StepPlan, str]:
    best = max(rates, key=rates.get)
    plain = next(
        (p for p in rates if (p.precision, p.channels_last, p.compile) == ("fp32", False, "none")),
        None,
    )
    if plain is not None and rates[plain] >= (1 - TIE) * rates[best]:
        best = plain
    shown = ", ".join(f"{p.label()} {r:.0f}" for p, r in sorted(rates.items(), key=lambda i: -i[1]))
    return best, f"images/s {shown}"


def probe(
    cfg: Config,
    device: torch.device,
    micro_batch: int,
    world_size: int = 1,
    content_box: list | None = None,
) -> StepPlan:
    """Time the candidates (eager first; then compiled and Adam variants of the best) and
    return the fastest, with the measured rates in its detail."""
    choices = _choices(cfg, device, world_size)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        fused0 = choices["fused"][0]
        eager_compile = "none" if "none" in choices["compile"] else choices["compile"][0]
        first = [
            StepPlan(p, cl, eager_compile, fused0)
            for p in choices["precision"]
            for cl in choices["channels_last"]
        ]
        rates = time_candidates(cfg, device, micro_batch, first, content_box=content_box)
        best, _ = pick_plan(rates)
        more = [
            dataclasses.replace(best, compile=c) for c in choices["compile"] if c != best.compile
        ]
        more += [
            dataclasses.replace(best, fused_adam=f)
            for f in choices["fused"]
            if f != best.fused_adam
        ]
        if more:
            rates.update(
                time_candidates(cfg, device, micro_batch, [best, *more], content_box=content_box)
            )
    if not rates:
        raise TrainingError("the step probe could run no variant of the training step")
    best, detail = pick_plan(rates)
    return dataclasses.replace(best, how="probed", detail=detail)


def _resumed_plan(
    resumed: dict, device: torch.device, world_size: int, accum: int
) -> tuple[StepPlan | None, str]:
    """A checkpoint's plan if it still fits the device and world size this run has (then the
    bits continue as they were), else None and why."""
    plan = StepPlan.from_dict(resumed, "checkpoint", "a resumed run keeps its plan")
    was_device = resumed.get("device", device.type)
    problems = plan_problems(plan, device, world_size, accum)
    if was_device != device.type:
        problems.insert(0, f"it was chosen for {was_device}, this run is on {device.type}")
    return (None, "; ".join(problems)) if problems else (plan, "")


def choose(
    cfg: Config,
    device: torch.device,
    micro_batch: int,
    cache_path: Path,
    world_size: int = 1,
    resumed: dict | None = None,
    content_box: list | None = None,
) -> StepPlan:
    """The step plan: a resumed checkpoint's (when it still fits this device and world size),
    every setting forced, a cached probe, or a new probe (then cached)."""
    choices = _choices(cfg, device, world_size)
    accum = cfg.train.grad_accum_steps
    if resumed:
        plan, why = _resumed_plan(resumed, device, world_size, accum)
        if plan is not None:
            return plan
        log.warning(
            "the checkpoint's step plan (%s) does not fit this run: %s; choosing anew (the "
            "numbers from here differ in the last bits from an uninterrupted run)",
            StepPlan.from_dict(resumed, "checkpoint").label(),
            why,
        )
    if all(len(v) == 1 for v in choices.values()):
        only = StepPlan(
            choices["precision"][0],
            choices["channels_last"][0],
            choices["compile"][0],
            choices["fused"][0],
        )
        how = (
            "rule"
            if any(_auto(cfg, k) for k in ("precision", "compile", "fused_adam"))
            else "forced"
        )
        return dataclasses.replace(only, how=how, detail="nothing to measure here")
    key = cache_key(cfg, device, micro_batch, choices)
    entry = read_cache(cache_path).get(key)
    if isinstance(entry, dict) and isinstance(entry.get("plan"), dict):
        try:
            cached = StepPlan.from_dict(entry["plan"], "cached", entry.get("detail", ""))
            if not plan_problems(cached, device, world_size, accum):
                return cached
        except TypeError:
            pass  # an entry of another version: probe again
    log.info("step probe: timing %s on %s (cached afterwards in %s)", choices, device, cache_path)
    plan = probe(cfg, device, micro_batch, world_size, content_box)
    write_cache(
        cache_path,
        key,
        {
            "plan": plan.as_dict(),
            "detail": plan.detail,
            "when": datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    return plan


def _auto(cfg: Config, name: str) -> bool:
    return getattr(cfg.train, name) == "auto"


# How long the other ranks wait for rank 0's plan: a cold probe on CUDA compiles several
# variants, which can outlast NCCL's default 10-minute collective timeout.
PLAN_WAIT = timedelta(minutes=60)


def plan_for_rank(
    cfg: Config,
    device: torch.device,
    env: DistEnv,
    batch: int,
    checkpoint_path: Path,
    content_box: list | None = None,
) -> StepPlan:
    """Precision, layout, compilation and Adam kernel for a training rank: rank 0 decides (a
    resumed checkpoint's plan, the forced settings, a cached or a new probe), every rank follows.

    The others wait for it on a gloo group of their own with a timeout that covers a cold
    probe (`PLAN_WAIT`), created before rank 0 starts probing."""
    from vae_pipeline.config.environment import autotune_cache_path
    from vae_pipeline.train import checkpoint

    with patient_group(PLAN_WAIT) as group:
        plan = None
        if env.is_main or not env.distributed:  # no group: each process decides
            resumed = None
            if checkpoint_path.is_file():
                resumed = checkpoint.peek(checkpoint_path, "step_plan")
            plan = choose(
                cfg, device, batch, autotune_cache_path(cfg), env.world_size, resumed, content_box
            )
        else:
            autocast_dtype(cfg.train.precision, device)  # the same refusal on every rank
        return broadcast_object(plan, group)
