"""Faults around checkpoints: a write that dies half-way, a damaged file, temporary files left
behind, and messages that say which checkpoint really exists."""

import os
import subprocess

import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train import checkpoint
from vae_pipeline.train.launch import restart_hint
from vae_pipeline.train.step import TrainingError
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root


def _cfg(**train):
    params = tiny_params()
    params["train"].update(train)
    return build_config(params)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_write_that_dies_half_way_leaves_the_previous_file_loadable(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.atomic_save({"epoch": 1, "w": torch.arange(5.0)}, path)

    def dies_half_way(obj, f):  # the first bytes reach the disk, then the process fails
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_save({"epoch": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    state = checkpoint.load(path)  # the previous checkpoint, whole
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(5.0))


def test_a_damaged_checkpoint_is_one_error_naming_the_file_and_the_choices(prepared, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(epochs=1), out, workdir=prepared).fit()
    blob = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(blob[: len(blob) // 2])  # truncated
    with pytest.raises(TrainingError) as err:
        Trainer(_cfg(epochs=2), out, workdir=prepared).fit()
    message = str(err.value)
    assert "\n" not in message and str(out / "checkpoint.pt") in message
    assert "cannot be read" in message and "Move it aside" in message
    assert "cannot be read" in restart_hint(out)  # the launcher does not promise a resume


def test_restart_hints_say_what_checkpoint_exists(prepared, tmp_path):
    assert "No checkpoint was written" in restart_hint(tmp_path / "nothing")
    cfg = _cfg(epochs=2, checkpoint_every=3)  # 4 steps per epoch: step 6 is epoch 2, step 2
    out = tmp_path / "run"
    trainer = Trainer(cfg, out, workdir=prepared)
    seen = {"n": 0}

    def stop_at_step_8(module, args):
        if module.training:
            seen["n"] += 1
            if seen["n"] == 8:
                raise KeyboardInterrupt

    trainer.model.encoder.register_forward_pre_hook(stop_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert restart_hint(out).endswith("(epoch 2, step 2).")
    Trainer(cfg, out, workdir=prepared).fit()
    assert restart_hint(out).endswith("(epoch 2).")


def test_a_nan_after_a_mid_epoch_checkpoint_names_that_checkpoint(prepared, tmp_path):
    cfg = _cfg(epochs=3, checkpoint_every=3)
    trainer = Trainer(cfg, tmp_path / "nan", workdir=prepared)
    seen = {"n": 0}

    def nan_at_step_8(module, args):
        if module.training:
            seen["n"] += 1
            return (args[0] * float("nan"),) if seen["n"] == 8 else None

    trainer.model.encoder.register_forward_pre_hook(nan_at_step_8)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    assert "at epoch 2, step 4 " in str(err.value)
    assert "(the last is epoch 2, step 2)" in str(err.value)  # not "epoch 1"


def test_temporary_files_of_dead_writers_are_removed_at_the_next_start(prepared, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = _dead_pid()
    stale = [out / f".checkpoint.pt.tmp-{dead}", out / f".model.pt.tmp-{dead}"]
    live = out / f".checkpoint.pt.tmp-{os.getpid()}"  # a writer still running
    for path in (*stale, live):
        path.write_bytes(b"partial")
    Trainer(_cfg(epochs=1), out, workdir=prepared)
    assert not any(p.exists() for p in stale) and live.exists()


def test_non_finite_weights_in_a_finished_checkpoint_are_the_damaged_case(prepared, tmp_path):
    out = tmp_path / "run"
    Trainer(_cfg(epochs=1), out, workdir=prepared).fit()
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["model"]["fc_mu.weight"][0, 0] = float("nan")  # planted after training
    torch.save(state, out / "checkpoint.pt")
    model_before = (out / "model.pt").read_bytes()
    for epochs in (1, 2):  # finished, and asked for more
        with pytest.raises(TrainingError) as err:
            Trainer(_cfg(epochs=epochs), out, workdir=prepared).fit()
        message = str(err.value)
        assert "\n" not in message and str(out / "checkpoint.pt") in message
        assert "non-finite values (model.fc_mu.weight)" in message and "Move it aside" in message
    assert "non-finite" in restart_hint(out) and "resumes" not in restart_hint(out)
    assert (out / "model.pt").read_bytes() == model_before  # the finished model is untouched
