"""Training throughput: the Trainer against a plain PyTorch loop, and DDP's overhead.

    python bench/train_throughput.py                    # 2048 Fashion-MNIST images, 15 rounds
    python bench/train_throughput.py --images 4096 --rounds 21
    python bench/train_throughput.py --device cuda --channels 3 --image-size 250   # the seed's

Side by side in one run, alternating round by round (so a noisy neighbour slows both):
0. The headroom: the fastest training step the device allows on one fixed batch already on
   the device (no data path), over the step variants the trainer's probe chooses from (fp32 /
   bf16 autocast x NCHW / channels_last, eager; on CUDA also compiled, with CUDA graphs, and
   with fused Adam), each timed in interleaved rounds.
1. `Trainer._run_epoch` (what `vae-pipeline train` runs per rank: its data path, per-step
   finiteness check, device-side sums) against a plain loop written out by hand: the same
   ConvVAE, data (a DataLoader over the memory-mapped uint8 split), batch, Adam and loss,
   nothing else, in each variant the device offers (fp32 / bf16 autocast where it runs at
   speed x NCHW / channels_last); the trainer's defaults are given against the best of
   them, round by round. One epoch each per round. The trainer runs twice: with its defaults (every
   `auto`: the step variant its probe picks, the data resident on the device) and like for like
   (fp32, the plain loop's NCHW layout). Then the same one step at a time on one fixed batch
   (no data loading: less noise). The trainer's best epoch is also given as a fraction of the
   fastest fixed-batch step of part 0, with the TFLOP/s it achieves.
2. The Trainer at world size 1 inside a real process group (NCCL on CUDA, gloo on CPU)
   against the Trainer without one: one rank is not wrapped in DDP, so this should be 1.0x.
It reports images/s (best round), the paired ratio (median over rounds), and the model's
training FLOP rate (forward + backward, torch's FlopCounterMode) as a fraction of this
machine's fp32 GEMM rate, measured in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.distributed as dist
from common import gemm_gflops
from torch.utils.data import DataLoader, DistributedSampler
from torch.utils.flop_counter import FlopCounterMode

from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.model import ConvVAE
from vae_pipeline.train import autotune
from vae_pipeline.train.step import StepPlan, bf16_supported
from vae_pipeline.train.trainer import Trainer


def plain_loss(model: ConvVAE, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
    """Negative ELBO per example, averaged: BCE on the logits + the closed-form KL."""
    mu, logvar = model.encode(x)
    z = mu + torch.exp(0.5 * logvar) * (torch.randn_like(mu) if eps is None else eps)
    logits = model.decode_logits(z)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return (bce + kl) / x.shape[0]


class PlainLoop:
    """The loop written out by hand. It draws the same batches (a DistributedSampler of one
    replica with the trainer's seed) and the same noise as the trainer (drawn on the device,
    as the trainer does), so the two models follow the same trajectory and any
    weight-dependent speed (denormals) affects both alike. Variants: fp32 or bf16 autocast,
    NCHW or channels_last, so the trainer is compared with the best a hand-written loop gets."""

    def __init__(
        self,
        cfg,
        split: PreparedSplit,
        device: torch.device,
        bf16: bool = False,
        channels_last: bool = False,
    ):
        self.cfg, self.device = cfg, device
        self.format = torch.channels_last if channels_last else torch.contiguous_format
        self.autocast = torch.autocast(device.type, torch.bfloat16, enabled=bf16)
        torch.manual_seed(cfg.train.seed)
        self.model = ConvVAE(cfg.data.channels, cfg.data.image_size, cfg.model.latent_dim)
        self.model.to(device, memory_format=self.format)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.train.lr)
        self.sampler = DistributedSampler(
            split, num_replicas=1, rank=0, shuffle=True, seed=cfg.train.seed, drop_last=True
        )
        self.loader = DataLoader(
            split,
            batch_size=cfg.train.batch_size,
            sampler=self.sampler,
            drop_last=True,
            pin_memory=device.type == "cuda",
        )

    def step(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> None:
        with self.autocast:
            loss = plain_loss(self.model, x, eps)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def epoch(self, epoch: int) -> float:
        """images/s over one epoch."""
        self.model.train()
        self.sampler.set_epoch(epoch)
        seed = self.cfg.train.seed * 1_000_003 + epoch
        noise = torch.Generator(device=self.device).manual_seed(seed)
        n, start = 0, time.perf_counter()
        for images, _ in self.loader:
            x = images.to(self.device, non_blocking=True).float() / 255
            x = x.contiguous(memory_format=self.format)
            shape = (x.shape[0], self.cfg.model.latent_dim)
            self.step(x, torch.randn(shape, generator=noise, device=self.device))
            n += x.shape[0]
        synchronize(self.device)
        return n / (time.perf_counter() - start)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], n: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize(device)
    return time.perf_counter() - start


def trainer_epoch(trainer: Trainer, epoch: int) -> float:
    return trainer._run_epoch(epoch)["images_per_s"]


def training_flops_per_image(cfg, device: torch.device) -> float:
    model = ConvVAE(cfg.data.channels, cfg.data.image_size, cfg.model.latent_dim).to(device)
    x = torch.rand(8, cfg.data.channels, cfg.data.image_size, cfg.data.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        plain_loss(model, x).backward()
    return counter.get_total_flops() / 8


def side_by_side(runs: dict, rounds: int, with_rates: bool = False) -> tuple:
    """Best images/s of each, and each one's per-round ratio to the last one (the reference);
    with `with_rates`, every round's images/s too. The order alternates round by round, so a
    noisy neighbour slows all of them alike."""
    names = list(runs)
    for run in runs.values():
        run(0)  # warm-up epoch
    rates: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            rates[name].append(runs[name](r + 1))
        shown = ", ".join(f"{rates[n][-1]:.0f}" for n in names)
        print(f"#   round {r + 1}/{rounds}: images/s {shown}", file=sys.stderr, flush=True)
    ref = rates[names[-1]]
    ratios = {name: [a / b for a, b in zip(v, ref, strict=True)] for name, v in rates.items()}
    best = {name: max(v) for name, v in rates.items()}
    return (best, ratios, rates) if with_rates else (best, ratios)


def spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def step_variants(device: torch.device) -> list[StepPlan]:
    """The eager step variants of the headroom rows (those the trainer's probe may pick)."""
    precisions = ["fp32", "bf16"] if bf16_supported(device) else ["fp32"]
    fused = device.type == "cuda"
    return [StepPlan(p, cl, "none", fused) for p in precisions for cl in (False, True)]


def headroom(cfg, device: torch.device, flops: float, rounds: int) -> float:
    """Part 0: the fastest fixed-batch step over the variants (median of `rounds` interleaved
    rounds of about a second each); prints their table. On CUDA the fastest eager variant is
    then timed compiled and with CUDA graphs (two compiles, not eight), as the probe does;
    Dynamo is reset afterwards, so the trainers' compiles start from a clean cache."""
    eager = autotune.time_candidates(
        cfg, device, cfg.train.batch_size, step_variants(device), rounds, round_seconds=1.0
    )
    rates = dict(eager)
    if device.type == "cuda":
        best = max(eager, key=eager.get)
        compiled = [dataclasses.replace(best, compile=c) for c in ("default", "reduce-overhead")]
        try:
            rates |= autotune.time_candidates(
                cfg, device, cfg.train.batch_size, [best, *compiled], rounds, round_seconds=1.0
            )
        finally:
            torch._dynamo.reset()
    print("| fixed-batch step, data already on the device | images/s | TFLOP/s |")
    print("|---|---|---|")
    for plan, rate in sorted(rates.items(), key=lambda item: -item[1]):
        print(f"| {plan.label()} | {rate:.0f} | {rate * flops / 1e12:.2f} |", flush=True)
    return max(rates.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--images", type=int, default=2048, help="training images (default 2048)")
    p.add_argument("--rounds", type=int, default=15, help="measured epochs of each (default 15)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--latent-dim", type=int, default=32)
    p.add_argument(
        "--image-size", type=int, default=32, help="32 = the demo; 250 = the seed's config"
    )
    p.add_argument("--channels", type=int, default=1, help="1 = the demo; 3 = the seed's config")
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = p.parse_args()
    logging.getLogger("vae_pipeline").setLevel(logging.WARNING)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")

    params = {
        "data": {"limit": args.images, "image_size": args.image_size, "channels": args.channels},
        "model": {"latent_dim": args.latent_dim},
        "train": {"batch_size": args.batch_size, "log_every": 10**9},
    }
    cfg = build_config(params)  # the trainer's defaults (channels_last; bf16 autocast on CUDA)
    # like for like with the plain loop: fp32, NCHW
    same = {
        **params["train"],
        "channels_last": False,
        "precision": "fp32",
        "compile": False,
        "fused_adam": False,
    }
    plain_cfg = build_config({**params, "train": same})
    with tempfile.TemporaryDirectory(prefix="vae-bench-") as tmp:
        root = Path(tmp)
        snapshot_source(cfg, root)
        prepare(cfg, root)
        split = PreparedSplit(root / cfg.data.prepared_dir, "train")
        peak = gemm_gflops(device=device)
        flops = training_flops_per_image(cfg, device)
        where = (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else (
                f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
            )
        )
        print(f"# {date.today()}  {where}  torch {torch.__version__}")
        print(
            f"# fp32 GEMM {peak:.0f} GFLOP/s; training {flops / 1e6:.1f} MFLOP per image "
            f"(forward + backward) at {args.channels}x{args.image_size}x{args.image_size}; "
            f"{len(split)} training images, batch {args.batch_size}; {args.rounds} paired epochs"
        )

        def trainer(c, name: str) -> Trainer:
            return Trainer(c, root / name, workdir=root, device=device)

        # 0. The headroom: the fastest fixed-batch step of any variant on this device.
        fastest = headroom(cfg, device, flops, args.rounds)

        # 1. Whole epochs: the trainer (defaults, and like for like) against the plain loop.
        default, same_as_plain = trainer(cfg, "default"), trainer(plain_cfg, "like-for-like")
        defaults = (
            f"trainer, defaults ({default.plan.describe()}; data {default.batches.describe()})"
        )
        # the plain loop in every variant the device offers (bf16 where it runs at speed)
        plains = {
            f"plain loop, {'bf16 autocast' if bf16 else 'fp32'} "
            f"{'channels_last' if cl else 'NCHW'}": PlainLoop(cfg, split, device, bf16, cl)
            for bf16 in ([False, True] if bf16_supported(device) else [False])
            for cl in (True, False)
        }
        runs = {
            defaults: lambda e: trainer_epoch(default, e),
            "trainer, fp32 NCHW (as the plain loop)": lambda e: trainer_epoch(same_as_plain, e),
        }
        runs |= {name: (lambda e, loop=loop: loop.epoch(e)) for name, loop in plains.items()}
        best, ratios, rates = side_by_side(runs, args.rounds, with_rates=True)
        # the best plain-loop variant by its median epoch, then paired ratios against it (a
        # per-round maximum over near-equal variants would be biased upwards by the noise)
        plain_best = max(plains, key=lambda n: statistics.median(rates[n]))
        vs_best = [a / b for a, b in zip(rates[defaults], rates[plain_best], strict=True)]
        print(
            "| loop | images/s (best epoch) | GFLOP/s | of GEMM rate | "
            f"/ {list(runs)[-1]}, median (range) |"
        )
        print("|---|---|---|---|---|")
        for name, rate in best.items():
            gflops = rate * flops / 1e9
            print(
                f"| {name} | {rate:.0f} | {gflops:.0f} | {gflops / peak:.0%} | {spread(ratios[name])} |"
            )
        print(
            f"# trainer defaults / the best plain-loop variant ({plain_best}, by median): "
            f"{spread(vs_best)}"
        )
        print(
            f"# trainer defaults, best epoch: {best[defaults] / fastest:.2f}x the fastest "
            f"fixed-batch step ({fastest:.0f} images/s), {best[defaults] * flops / 1e12:.2f} TFLOP/s"
        )

        # 2. One optimizer step at a time on one fixed batch (no data loading, less noise):
        # what the trainer adds per step (finiteness flags, device-side sums), like for like.
        x = torch.from_numpy(split.images[: args.batch_size].copy()).to(device).float() / 255
        eps = torch.randn(args.batch_size, args.latent_dim, device=device)
        steps = 4
        stepper, plain = trainer(plain_cfg, "step"), PlainLoop(cfg, split, device)
        best, ratios = side_by_side(
            {
                "trainer step": lambda e: (
                    steps * len(x) / timed(lambda: stepper._run_batch(x, eps), steps, device)
                ),
                "plain step": lambda e: (
                    steps * len(x) / timed(lambda: plain.step(x, eps), steps, device)
                ),
            },
            args.rounds * 2,
        )
        print(
            f"# per step, same batch, fp32 NCHW: trainer / plain {spread(ratios['trainer step'])} "
            f"over {args.rounds * 2} paired blocks of {steps} steps; best "
            f"{best['trainer step']:.0f} vs {best['plain step']:.0f} images/s"
        )

        # 3. DDP at world size 1 (a real process group: NCCL on CUDA, gloo on CPU) against no
        # DDP. Fresh trainers: the pair starts at the same weights, on the same trajectory.
        alone = trainer(cfg, "no-ddp")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1
        )
        try:
            grouped = trainer(cfg, "ddp")  # a process group of one: not wrapped in DDP
            assert grouped.ddp is None
            best, ratios = side_by_side(
                {
                    "in a 1-rank process group": lambda e: trainer_epoch(grouped, e),
                    "no process group": lambda e: trainer_epoch(alone, e),
                },
                args.rounds,
            )
        finally:
            dist.destroy_process_group()
        print(
            f"| trainer (defaults), world size 1, {backend} | images/s (best epoch) | "
            "/ no process group, median (range) |"
        )
        print("|---|---|---|")
        for name, rate in best.items():
            print(f"| {name} | {rate:.0f} | {spread(ratios[name])} |")


if __name__ == "__main__":
    main()
