"""The first minute of a GPU lease: the CUDA behaviour the CPU suite can only stand in for.

    python bench/gpu_smoke.py                 # on the GPU host (or --device cpu to try it here)

One row per check, printed as it finishes (a lease that ends early still leaves the rows):
ranks per node (`train.nproc_per_node: auto`), the step loop under
`torch.cuda.set_sync_debug_mode("error")` (no host sync or copy per step: the elbo with dynamic
binarization and KL warm-up, the iwae objective with warm-up and accumulation), bf16 against
fp32 likelihoods of the same weights, a bitwise resume on the device with
`train.deterministic: true`, and the probed plan (all `auto`) trained for an epoch with no
recompile (last: its probe compiles). Needs only torch, numpy, pydantic, PyYAML and the Fashion-MNIST IDX files.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.distributed import ranks_per_node
from vae_pipeline.train.trainer import Trainer

FAILED: list[str] = []


def row(name: str, check: Callable[[], str]) -> None:
    t0 = time.perf_counter()
    try:
        result = check()
    except Exception as exc:  # report and go on: every row counts
        result = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
        FAILED.append(name)
    print(f"| {name} | {result} | {time.perf_counter() - t0:.1f} |", flush=True)


def params(**train) -> dict:
    return {
        "data": {"limit": 2048},
        "model": {"latent_dim": 16},
        "train": {"epochs": 1, "batch_size": 128, "log_every": 10**6, **train},
    }


def trainer(root: Path, name: str, device: torch.device, **train) -> Trainer:
    cfg = build_config(params(autotune_cache=str(root / "plans.json"), **train))
    return Trainer(cfg, root / name, device=device, workdir=root)


# no probe (its compiles would take the part's minute): the step loop in plain fp32 eager
EAGER = {"precision": "fp32", "channels_last": False, "compile": False, "fused_adam": False}


def sync_free(root: Path, device: torch.device, **train) -> str:
    t = trainer(root, "sync-" + "-".join(map(str, train.values())), device, **EAGER, **train)
    if device.type != "cuda":
        return "n/a on CPU (tests/train/test_sync_free.py checks it there)"
    real = t._train_step

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    t._train_step = strict
    record = t._run_epoch(0)
    return f"ok: {t.steps_per_epoch} steps, no sync; {record['images_per_s']:.0f} img/s"


def bf16_gap(device: torch.device) -> str:
    torch.manual_seed(0)
    model = ConvVAE(1, 32, 16, "discretized_logistic").to(device)
    x = (torch.randint(0, 256, (64, 1, 32, 32), device=device).float()) / 255
    z = torch.randn(64, 16, device=device)
    with torch.no_grad():
        fp32 = model.log_likelihood(model.decode_logits(z), x)
        with torch.autocast(device.type, torch.bfloat16):
            out = model.decode_logits(z)
        bf16 = model.log_likelihood(out.float(), x)
    gap = (fp32 - bf16).abs()
    return f"discretized logistic: gap mean {gap.mean():.3f}, max {gap.max():.3f} nats/image"


def resume_bitwise(root: Path, device: torch.device) -> str:
    straight = trainer(root, "straight", device, epochs=2, **EAGER)
    straight.fit()
    trainer(root, "resumed", device, epochs=1, **EAGER).fit()
    again = trainer(root, "resumed", device, epochs=2, **EAGER)
    again.fit()
    same = all(
        torch.equal(a, b)
        for a, b in zip(
            straight.model.state_dict().values(), again.model.state_dict().values(), strict=True
        )
    )
    if not same:
        raise AssertionError("resumed weights differ from the uninterrupted run's")
    return "ok: 1 + 1 epochs == 2 epochs, bit for bit"


def probed_plan(root: Path, device: torch.device) -> str:
    t = trainer(root, "probed", device, precision="auto", compile="auto", fused_adam="auto")
    t.fit()
    more = t.compile_watch.graphs_since_first
    if more:
        raise AssertionError(f"{t.plan.label()} recompiled {more} time(s)")
    return f"{t.plan.describe()[:300]}; no recompile"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu"
    )
    args = p.parse_args()
    logging.getLogger("vae_pipeline").setLevel(logging.WARNING)
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    print(
        f"# gpu_smoke on {torch.cuda.get_device_name(device) if args.device == 'cuda' else 'cpu'}"
    )
    print("| check | result | seconds |\n|---|---|---|", flush=True)
    row(
        "train.nproc_per_node: auto",
        lambda: (
            f"{ranks_per_node('auto', args.device)} rank(s) "
            f"({torch.cuda.device_count()} GPU(s) visible)"
        ),
    )
    with tempfile.TemporaryDirectory(prefix="vae-gpu-smoke-") as tmp:
        root = Path(tmp)
        cfg = build_config(params())
        snapshot_source(cfg, root)
        prepare(cfg, root)
        row(
            "step loop: elbo, dynamic binarization, warm-up",
            lambda: sync_free(root, device, binarize="dynamic", kl_warmup_steps=50),
        )
        row(
            "step loop: iwae K=4, warm-up, accumulation 2",
            lambda: sync_free(
                root,
                device,
                objective="iwae",
                iw_samples=4,
                kl_warmup_steps=50,
                grad_accum_steps=2,
            ),
        )
        row("bf16 vs fp32 likelihood, same weights", lambda: bf16_gap(device))
        row("resume on the device, deterministic", lambda: resume_bitwise(root, device))
        row("probed plan (every auto), one epoch", lambda: probed_plan(root, device))
    if FAILED:
        raise SystemExit(f"failed: {', '.join(FAILED)}")


if __name__ == "__main__":
    main()
