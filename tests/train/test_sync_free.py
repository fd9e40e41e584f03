"""The step loop neither copies from the host to the device nor waits for the device.

On CPU: every call from the project's own code that would be a host-to-device copy on CUDA
(`Tensor.to(device)`, `torch.tensor`, `torch.as_tensor`) or a host sync (`.item()`, `bool()`,
`.tolist()`, `.cpu()`, ...) is recorded while an epoch runs; an epoch twice as long must record
exactly as many (the per-epoch work: the sampler's order, the end-of-epoch check), so no step
makes one. On CUDA: `torch.cuda.set_sync_debug_mode("error")` around every step."""

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

import vae_pipeline
from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params

SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "cuda")
COPIES = ("tensor", "as_tensor")
SETTINGS = {
    "elbo, dynamic binarization, KL warm-up": {"binarize": "dynamic", "kl_warmup_steps": 50},
    "iwae K=2, KL warm-up, accumulation": {
        "objective": "iwae",
        "iw_samples": 2,
        "kl_warmup_steps": 50,
        "grad_accum_steps": 2,
    },
}


def _prepared(tmp_path_factory, limit: int):
    root = tmp_path_factory.mktemp(f"sync-{limit}")
    cfg = build_config(tiny_params(data={"limit": limit}))
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root


@pytest.fixture(scope="module")
def short_and_long(tmp_path_factory):
    """Two datasets: 7 and 15 steps per epoch at batch 32."""
    return _prepared(tmp_path_factory, 256), _prepared(tmp_path_factory, 512)


PACKAGE = str(Path(vae_pipeline.__file__).parent)


def _ours(frame, also: tuple[str, ...] = ()) -> bool:
    return frame.f_code.co_filename.startswith((PACKAGE, *also))


class Recorder:
    """Counts copy- and sync-making calls whose caller is the project's code."""

    def __init__(self, monkeypatch, also: tuple[str, ...] = ()):
        self.calls: Counter = Counter()
        self.also = also  # more files counted as the project's (the negative control's)
        for name in SYNCS:
            self._wrap(monkeypatch, torch.Tensor, name, f"Tensor.{name}")
        for name in COPIES:
            self._wrap(monkeypatch, torch, name, f"torch.{name}")
        real_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            moves = "device" in kwargs or any(
                isinstance(a, torch.device | str | torch.Tensor) for a in args
            )
            if moves:
                self._note(sys._getframe(1), "Tensor.to(device)")
            return real_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", to)

    def _note(self, frame, what: str) -> None:
        if _ours(frame, self.also):
            self.calls[f"{what} at {frame.f_code.co_filename.split('/')[-1]}:{frame.f_lineno}"] += 1

    def _wrap(self, monkeypatch, owner, name: str, what: str) -> None:
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            self._note(sys._getframe(1), what)
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)


def _calls_in_one_epoch(root, train: dict, monkeypatch, also=()) -> tuple[Counter, int]:
    params = tiny_params()
    params["train"].update({"batch_size": 32, "log_every": 10**6, **train})
    trainer = Trainer(build_config(params), root / "run", workdir=root)
    with monkeypatch.context() as m:
        recorder = Recorder(m, also)
        trainer._run_epoch(0)
    return recorder.calls, trainer.progress.global_step


@pytest.mark.parametrize("name", SETTINGS)
def test_no_step_copies_to_the_device_or_syncs(short_and_long, monkeypatch, name):
    short, long = short_and_long
    few, steps_a = _calls_in_one_epoch(short, SETTINGS[name], monkeypatch)
    many, steps_b = _calls_in_one_epoch(long, SETTINGS[name], monkeypatch)
    assert steps_b > steps_a + 5  # the second epoch really is longer
    per_step = {k: many[k] - few[k] for k in many | few if many[k] != few[k]}
    assert per_step == {}, f"calls made per step (long epoch minus short): {per_step}"
    assert few, "the recorder saw nothing: it would not see a per-step call either"


def test_the_recorder_sees_a_per_step_copy(short_and_long, monkeypatch):
    """The check can fail: a noise draw copied to the device each step (the old code) is seen."""
    short, long = short_and_long

    def old_noise(self, noise):
        shape = (self.cfg.train.batch_size, self.cfg.model.latent_dim)
        return torch.randn(shape, generator=torch.Generator()).to(self.device)

    monkeypatch.setattr(Trainer, "_step_noise", old_noise)
    few, _ = _calls_in_one_epoch(short, {}, monkeypatch, also=(__file__,))
    many, _ = _calls_in_one_epoch(long, {}, monkeypatch, also=(__file__,))
    assert any(k.startswith("Tensor.to(device)") and many[k] > few[k] for k in many)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", SETTINGS)
def test_no_step_syncs_on_cuda(short_and_long, monkeypatch, name):
    short, _ = short_and_long
    params = tiny_params()
    params["train"].update({"batch_size": 32, "log_every": 10**6, **SETTINGS[name]})
    trainer = Trainer(
        build_config(params), short / "cuda", device=torch.device("cuda", 0), workdir=short
    )
    assert trainer.batches.resident is not None
    real = Trainer._train_step

    def strict(self, *args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(Trainer, "_train_step", strict)
    record = trainer._run_epoch(0)
    assert record["train_loss"] > 0
