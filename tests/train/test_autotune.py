"""The step probe: what `auto` picks, that it is cached, forced, kept across a resume."""

import json

import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.config.environment import autotune_cache_path
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train import autotune, step
from vae_pipeline.train.autotune import choose, pick_plan
from vae_pipeline.train.step import StepPlan, TrainingError
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params

CPU = torch.device("cpu")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cfg(tmp_path, **train):
    params = tiny_params()
    params["train"].update({"channels_last": "auto", "autotune_cache": str(tmp_path / "c.json")})
    params["train"].update(train)
    return build_config(params)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("autotune")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root


def test_the_plain_variant_wins_ties_and_a_faster_one_wins_clearly():
    plain, nhwc = StepPlan("fp32", False), StepPlan("fp32", True)
    assert pick_plan({plain: 100.0, nhwc: 102.5})[0] == plain  # within 3%: not worth a change
    best, detail = pick_plan({plain: 100.0, nhwc: 110.0})
    assert best == nhwc and "fp32, channels_last 110" in detail and "fp32, NCHW 100" in detail
    bf16 = StepPlan("bf16", True, "default", True)
    assert pick_plan({plain: 100.0, bf16: 180.0})[0] == bf16


def test_auto_layout_on_cpu_is_probed_once_then_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)  # a CPU without bf16 units
    cfg = _cfg(tmp_path, precision="auto")
    path = autotune_cache_path(cfg)
    timed = []
    real = autotune.time_candidates

    def counting(*args, **kwargs):
        rates = real(*args, **kwargs)
        timed.append(rates)
        return rates

    monkeypatch.setattr(autotune, "time_candidates", counting)
    plan = choose(cfg, CPU, 64, path)
    assert plan.how == "probed" and len(timed) == 1
    # both layouts were timed, in fp32 eager with the default Adam (nothing else on a CPU
    # without bf16 units; tests/train/test_step.py has the one with them)
    assert {(p.channels_last, p.precision, p.compile, p.fused_adam) for p in timed[0]} == {
        (False, "fp32", "none", False),
        (True, "fp32", "none", False),
    }
    assert all(rate > 0 for rate in timed[0].values())
    assert plan.as_dict() == pick_plan(timed[0])[0].as_dict()  # the measured winner, by the rule
    cached = choose(cfg, CPU, 64, path)
    assert cached.how == "cached" and len(timed) == 1  # no second probe
    assert (cached.channels_last, cached.precision) == (plan.channels_last, plan.precision)
    entry = next(iter(json.loads(path.read_text()).values()))
    assert entry["plan"]["channels_last"] == plan.channels_last and "images/s" in entry["detail"]
    # another micro-batch is another shape: probed again
    assert choose(cfg, CPU, 32, path).how == "probed" and len(timed) == 2


def test_a_damaged_cache_is_probed_again_and_rewritten(tmp_path):
    cfg = _cfg(tmp_path)
    path = autotune_cache_path(cfg)
    path.write_text("{not json")
    assert choose(cfg, CPU, 16, path).how == "probed"
    assert json.loads(path.read_text())  # rewritten whole


def test_forced_settings_are_not_probed(tmp_path, monkeypatch):
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **k: pytest.fail("probed"))
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)  # a CPU without bf16 units
    cfg = _cfg(tmp_path, channels_last=False, precision="fp32", compile=False, fused_adam=False)
    plan = choose(cfg, CPU, 64, autotune_cache_path(cfg))
    assert (plan.how, plan.channels_last, plan.compile) == ("forced", False, "none")
    with pytest.raises(TrainingError, match=r"train.precision=bf16: this CPU \(no AVX-512 BF16"):
        choose(_cfg(tmp_path, precision="bf16"), CPU, 64, autotune_cache_path(cfg))
    # torch has a fused Adam for CPU too: forced, it is taken
    fused = _cfg(tmp_path, channels_last=False, compile=False, fused_adam=True)
    assert choose(fused, CPU, 64, autotune_cache_path(cfg)).fused_adam is True


def test_the_trainer_logs_its_plan_and_a_resume_keeps_it(prepared, tmp_path, caplog):
    cfg = _cfg(tmp_path, epochs=1)
    trainer = Trainer(cfg, tmp_path / "run", workdir=prepared)
    assert trainer.plan.how == "probed"
    assert trainer.plan.channels_last == trainer.model.encoder[2].weight.is_contiguous(
        memory_format=torch.channels_last
    )
    with caplog.at_level("INFO", logger="vae_pipeline"):
        trainer.fit()
    assert f"step {trainer.plan.label()} (probed: images/s" in caplog.text
    stored = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["step_plan"]
    assert stored["channels_last"] == trainer.plan.channels_last
    # The cache now says the opposite; a restart still resumes with the checkpoint's plan, so
    # the resumed run computes with the same kernels as the run it continues.
    path = autotune_cache_path(cfg)
    data = json.loads(path.read_text())
    for entry in data.values():
        entry["plan"]["channels_last"] = not entry["plan"]["channels_last"]
    path.write_text(json.dumps(data))
    again = Trainer(_cfg(tmp_path, epochs=2), tmp_path / "run", workdir=prepared)
    assert again.plan.how == "checkpoint" and again.plan.channels_last == stored["channels_last"]
    fresh = Trainer(cfg, tmp_path / "fresh", workdir=prepared)
    assert fresh.plan.how == "cached" and fresh.plan.channels_last != stored["channels_last"]


def test_one_rank_is_not_wrapped_in_ddp(prepared, tmp_path):
    import socket

    import torch.distributed as dist

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        trainer = Trainer(_cfg(tmp_path, channels_last=True), tmp_path / "one", workdir=prepared)
        assert trainer.env.distributed and trainer.ddp is None  # nothing to all-reduce
        trainer.fit()
    finally:
        dist.destroy_process_group()


@needs_cuda
def test_cuda_probe_times_every_variant_and_the_trainer_runs_the_winner(prepared, tmp_path):
    cfg = _cfg(tmp_path, precision="auto", compile="auto", fused_adam="auto", epochs=1)
    trainer = Trainer(cfg, tmp_path / "cuda", device=torch.device("cuda", 0), workdir=prepared)
    assert trainer.plan.how == "probed"
    for label in ("fp32, NCHW", "bf16 autocast, channels_last"):
        assert label in trainer.plan.detail  # measured, not assumed
    history = trainer.fit()
    assert history[0]["train_loss"] > 0 and trainer.batches.resident is not None
