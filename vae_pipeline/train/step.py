"""One training step: how it runs (`StepPlan`: precision, memory layout, compile, fused Adam),
the network it runs on (`build_network`) and its call (`ElboPath`: the ELBO or IWAE terms).

Kept apart from the trainer so the step-variant probe (`autotune`) times exactly what the
trainer runs.
"""

from __future__ import annotations

import dataclasses
import math
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


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The training autocast dtype for `train.precision` on `device` (None = plain fp32).

    bf16 only on CUDA: on CPUs without bf16 matrix units (like the one this project is tested
    on) a bf16 convolution is orders of magnitude slower than fp32, so `auto` is fp32 there and
    `bf16` is refused rather than silently slow."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return torch.bfloat16
        if precision == "bf16":
            raise TrainingError(
                f"train.precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 "
                "support; use train.precision=auto or fp32"
            )
        return None
    if precision == "bf16":
        raise TrainingError(
            f"train.precision=bf16 needs a CUDA device, and this run is on {device.type}: bf16 "
            "on CPU is far slower than fp32; use train.precision=auto (fp32 here) or fp32"
        )
    return None


class ElboPath(torch.nn.Module):
    """DDP hooks `forward`; this routes it to the per-example terms the loss needs (so every
    parameter, the Gaussian decoder's log sigma included, is used inside forward).

    `eps` of shape (batch, latent) gives the one-sample ELBO terms; (K, batch, latent) the
    importance-weighted bound too (`iwae`, with the KL weight `beta` inside each weight).
    With `dtype` (bf16 on CUDA) the network runs under autocast; the likelihood and KL are
    computed in fp32 from its outputs either way."""

    def __init__(self, vae: ConvVAE, dtype: torch.dtype | None = None):
        super().__init__()
        self.vae = vae
        self.dtype = dtype

    def _autocast(self, x: torch.Tensor):
        return nullcontext() if self.dtype is None else torch.autocast(x.device.type, self.dtype)

    def forward(
        self, x: torch.Tensor, eps: torch.Tensor, beta: float = 1.0
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


def learning_rate(tc: TrainConfig, step: int, total_steps: int) -> float:
    """train.lr at optimizer step `step` (0-based): constant, or cosine from lr to lr_min."""
    if tc.lr_schedule == "constant" or total_steps <= 1:
        return tc.lr
    progress = min(1.0, step / (total_steps - 1))
    return tc.lr_min + 0.5 * (tc.lr - tc.lr_min) * (1.0 + math.cos(math.pi * progress))


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
    torch (pytorch/pytorch#187732). The model's only buffer is the constant padding mask:
    nothing to broadcast before every forward."""
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
    ddp = (
        DDP(
            wrapped,
            device_ids=[device.index] if device.type == "cuda" else None,
            gradient_as_bucket_view=True,
            static_graph=tc.grad_accum_steps == 1,
            broadcast_buffers=False,
        )
        if env.distributed and env.world_size > 1
        else None
    )
    net = ddp if ddp is not None else wrapped
    if plan.compile != "none":
        net = torch.compile(net, mode=None if plan.compile == "default" else plan.compile)
    return Network(model, optimizer, ddp, net, memory_format, autocast)
