"""One training step: how it runs (`StepPlan`: precision, memory layout, compile, fused Adam),
the network it runs on (`build_network`) and its call (`ElboPath`: the ELBO or IWAE terms).

Kept apart from the trainer so the step-variant probe (`autotune`) times exactly what the
trainer runs.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from vae_pipeline.config import Config
from vae_pipeline.config.sections import TrainConfig
from vae_pipeline.elbo import iwae_terms, terms_from_outputs
from vae_pipeline.errors import UserError
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.distributed import DistEnv

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepPlan:
    """How the training step runs. `how`: forced (every setting given), probed, cached,
    checkpoint (a resumed run keeps its plan) or rule (nothing to choose)."""

    precision: str = "fp32"  # fp32 | bf16
    channels_last: bool = False
    compile: str = "none"  # none | default | reduce-overhead
    fused_adam: bool = False
    how: str = "rule"
    detail: str = ""

    def label(self) -> str:
        parts = [
            "bf16 autocast" if self.precision == "bf16" else "fp32",
            "channels_last" if self.channels_last else "NCHW",
        ]
        if self.compile != "none":
            parts.append(
                "compiled" + (" + CUDA graphs" if self.compile == "reduce-overhead" else "")
            )
        if self.fused_adam:
            parts.append("fused Adam")
        return ", ".join(parts)

    def describe(self) -> str:
        return f"{self.label()} ({self.how}{': ' + self.detail if self.detail else ''})"

    def as_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ("how", "detail")}

    @classmethod
    def from_dict(cls, data: dict, how: str, detail: str = "") -> StepPlan:
        fields = {f.name for f in dataclasses.fields(cls)} - {"how", "detail"}
        return cls(**{k: v for k, v in data.items() if k in fields}, how=how, detail=detail)


class TrainingError(UserError):
    """Training cannot go on (bad batch size, non-finite loss, incompatible checkpoint)."""


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this processor has bf16 matrix instructions (AVX-512 BF16 or AMX): where it does,
    bf16 autocast can beat fp32 on CPU (1.47x measured on such a machine), so the probe times
    it; where it does not, bf16 convolutions are emulated and far slower, and it is left out."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def bf16_supported(device: torch.device) -> bool:
    """bf16 autocast runs at speed here: a CUDA card with bf16, or a CPU with bf16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16()


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for `train.precision` on `device` (None = plain fp32).

    bf16 where the device runs it at speed (`bf16_supported`); `bf16` is refused elsewhere
    rather than silently slow, and `auto` may pick it only where it is supported (the probe
    decides)."""
    if precision == "fp32":
        return None
    if bf16_supported(device):
        return torch.bfloat16 if precision == "bf16" else None
    if precision == "bf16":
        what = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else "this CPU (no AVX-512 BF16 or AMX)"
        )
        raise TrainingError(
            f"train.precision=bf16: {what} has no fast bf16; use train.precision=auto or fp32"
        )
    return None


def plan_problems(
    plan: StepPlan, device: torch.device, world_size: int, grad_accum_steps: int
) -> list[str]:
    """Why `plan` cannot run here (empty when it can): bf16 where the device has none, CUDA
    graphs off CUDA, under DDP (several ranks) or with gradient accumulation (accumulating
    `.grad` across graph replays is a known upstream failure). Fused Adam runs on CUDA and CPU
    alike."""
    problems = []
    if plan.precision == "bf16" and not bf16_supported(device):
        problems.append(f"bf16 autocast is not supported at speed on {device.type}")
    if plan.compile == "reduce-overhead":
        if device.type != "cuda":
            problems.append("CUDA graphs (compile: reduce-overhead) need a CUDA device")
        if world_size > 1:
            problems.append(f"CUDA graphs need one rank, not {world_size} (DDP)")
        if grad_accum_steps > 1:
            problems.append(
                f"CUDA graphs cannot accumulate gradients (train.grad_accum_steps="
                f"{grad_accum_steps})"
            )
    return problems


def apply_determinism(deterministic: bool, device: torch.device) -> None:
    """`train.deterministic`: true = bitwise-reproducible kernels (cuDNN's deterministic
    algorithms, no benchmark autotuning, no TF32; deterministic algorithms where torch has
    them), so resume and rank parity hold bit for bit on CUDA as on CPU; false = cuDNN picks
    its fastest algorithms and matmuls/convolutions may use TF32 (faster on a GPU; runs differ
    in the last bits). CPU kernels are deterministic either way."""
    if device.type != "cuda":
        return
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cudnn.benchmark = not deterministic
    # the flags torch.export and MLflow's model logging set too: mixing them with the newer
    # fp32_precision API in one process is refused by torch
    torch.backends.cudnn.allow_tf32 = not deterministic
    torch.backends.cuda.matmul.allow_tf32 = not deterministic
    if deterministic:  # cuBLAS needs a fixed workspace for reproducible GEMMs
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic, warn_only=True)


class ElboPath(torch.nn.Module):
    """DDP hooks `forward`; this routes it to the per-example terms the loss needs (so every
    parameter, the Gaussian decoder's log sigma included, is used inside forward).

    `eps` of shape (batch, latent) gives the one-sample ELBO terms; (K, batch, latent) the
    importance-weighted bound too (`iwae`, with the KL weight `beta` inside each weight; the
    trainer passes it as a 0-d tensor on the device, updated in place, so a compiled step
    neither recompiles nor takes a CPU scalar when it changes).
    With `dtype` (bf16) the network runs under autocast, but for the decoder's last layer (the
    likelihood head, `model.likelihood_head`, in fp32); the likelihood and KL are computed in
    fp32 from its outputs either way."""

    def __init__(self, vae: ConvVAE, dtype: torch.dtype | None = None):
        super().__init__()
        self.vae = vae
        self.dtype = dtype

    def _autocast(self, x: torch.Tensor):
        return nullcontext() if self.dtype is None else torch.autocast(x.device.type, self.dtype)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, beta: float | torch.Tensor = 1.0
    ) -> dict[str, torch.Tensor]:
        if eps.dim() == 3:
            with self._autocast(x):
                mu, logvar = self.vae.encode(x)

            def decode(z: torch.Tensor) -> torch.Tensor:
                with self._autocast(x):
                    return self.vae.decode_logits(z)

            return iwae_terms(
                decode, self.vae.log_likelihood, x, mu.float(), logvar.float(), eps, beta
            )
        with self._autocast(x):
            logits, mu, logvar = self.vae.forward_logits(x, eps)
        return terms_from_outputs(
            logits.float(), mu.float(), logvar.float(), x, self.vae.log_likelihood
        )


def micro_batches(
    x: torch.Tensor, eps: torch.Tensor, accum: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A rank's batch and its noise as `accum` micro-batches (views: no copy). `eps` is
    (batch, latent), or (K, batch, latent) for iwae (split along the batch)."""
    eps_chunks = eps.chunk(accum, dim=1) if eps.dim() == 3 else eps.chunk(accum)
    return list(zip(x.chunk(accum), eps_chunks, strict=True))


def learning_rate(tc: TrainConfig, step: int, total_steps: int) -> float:
    """train.lr at optimizer step `step` (0-based): constant, or cosine from lr to lr_min;
    above train.lr_warmup_start, the first lr_warmup_steps steps rise linearly from there."""
    if tc.lr_schedule == "constant" or total_steps <= 1:
        rate = tc.lr
    else:
        progress = min(1.0, step / (total_steps - 1))
        rate = tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1.0 + math.cos(math.pi * progress))
    if step < tc.lr_warmup_steps and rate > tc.lr_warmup_start:
        return tc.lr_warmup_start + (rate - tc.lr_warmup_start) * step / tc.lr_warmup_steps
    return rate


@dataclass
class Network:
    """What a training step runs: the model, its optimizer, the DDP wrapper (None on one
    rank; its no_sync() serves gradient accumulation) and `net`, what a step calls (the ELBO
    path, wrapped and compiled as the plan says)."""

    model: ConvVAE
    optimizer: torch.optim.Optimizer
    ddp: DDP | None
    net: torch.nn.Module
    memory_format: torch.memory_format
    autocast: torch.dtype | None


def build_network(
    cfg: Config, plan: StepPlan, device: torch.device, env: DistEnv, content_box: list | None
) -> Network:
    """The ConvVAE in the plan's layout and precision on `device`, Adam, and the step's module.

    One rank has nothing to all-reduce: no DDP (measured 0.875-0.906x of no DDP on an H100
    under NCCL). Gradients are views into DDP's buckets (no copy per step); the graph is static
    (one-time bucket planning) except under no_sync, where static_graph is broken in current
    torch (pytorch/pytorch#187732). The model's only buffer is the constant padding mask, which
    each rank builds from the config: DDP ignores it, so it is neither broadcast at init nor
    before every forward (what the deprecated `broadcast_buffers=False` did; its replacement,
    `forward_sync_buffers=False`, alone would still broadcast buffers at init)."""
    tc = cfg.train
    model = ConvVAE(
        cfg.data.channels,
        cfg.data.image_size,
        cfg.model.latent_dim,
        cfg.model.likelihood,
        # the source's real pixels (Fashion-MNIST's 28x28 inside the padded 32x32)
        content_box=content_box,
    )
    memory_format = torch.channels_last if plan.channels_last else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=tc.lr, fused=True if plan.fused_adam else None
    )
    autocast = torch.bfloat16 if plan.precision == "bf16" else None
    wrapped = ElboPath(model, autocast)
    ddp = None
    if env.distributed and env.world_size > 1:
        # rank-local buffers (the padding mask): torch's documented way to leave them out
        rank_local = [name for name, _ in wrapped.named_buffers()]
        DDP._set_params_and_buffers_to_ignore_for_model(wrapped, rank_local)
        ddp = DDP(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            static_graph=tc.grad_accum_steps == 1,
            forward_sync_buffers=False,
        )
    net = ddp if ddp is not None else wrapped
    if plan.compile != "none":
        net = torch.compile(net, mode=None if plan.compile == "default" else plan.compile)
    return Network(model, optimizer, ddp, net, memory_format, autocast)


class CompileWatch:
    """Counts the graphs torch.compile builds once the compiled step has run, so a recompile,
    or Dynamo's recompile limit (after which the step silently runs eager), is logged as a
    warning naming the plan: never silent. `graphs_since_first` is the count a test asserts."""

    def __init__(self, plan: StepPlan):
        self.plan, self.active = plan, plan.compile != "none"
        self.first: int | None = None
        self.reported = 0
        if self.active:
            _LimitHandler.install()
        self.limits_seen = len(_LimitHandler.hits)

    @staticmethod
    def graphs() -> int:
        """Graphs Dynamo has compiled in this process so far."""
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def first_step_done(self) -> None:
        if self.active and self.first is None:
            self.first = self.graphs()

    @property
    def graphs_since_first(self) -> int:
        return 0 if self.first is None else self.graphs() - self.first

    def check(self, where: str) -> None:
        """Warn about graphs compiled since the first step (recompiles) and a hit limit."""
        if not self.active or self.first is None:
            return
        more = self.graphs_since_first
        if more > self.reported:
            log.warning(
                "the compiled training step (%s) recompiled: %d more graph(s) since its first "
                "step, by %s; each costs a compilation, and past torch._dynamo.config."
                "recompile_limit the step runs eager",
                self.plan.label(),
                more,
                where,
            )
            self.reported = more
        for hit in _LimitHandler.hits[self.limits_seen :]:
            log.warning(
                "torch.compile hit its recompile limit by %s: the training step now runs "
                "EAGER although the plan says %s (%s)",
                where,
                self.plan.label(),
                hit,
            )
        self.limits_seen = len(_LimitHandler.hits)


class _LimitHandler(logging.Handler):
    """Catches Dynamo's own "hit config.recompile_limit" warning (one handler per process)."""

    hits: list[str] = []
    _installed = False

    @classmethod
    def install(cls) -> None:
        if not cls._installed:
            logging.getLogger("torch._dynamo").addHandler(cls(logging.WARNING))
            cls._installed = True

    def emit(self, record: logging.LogRecord) -> None:
        if isinstance(record.msg, str) and "hit config." in record.msg:
            self.hits.append(record.getMessage().splitlines()[0])
