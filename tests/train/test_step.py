"""The step's settings that only matter on CUDA, checked where CPU can stand in: what
`train.deterministic` sets, CUDA graphs refused where they are unsafe, a resumed plan
re-validated against the device and world size it now runs on."""

import os

import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.train import autotune, step
from vae_pipeline.train.autotune import _choices, _resumed_plan, choose
from vae_pipeline.train.step import StepPlan, TrainingError, apply_determinism, plan_problems

from ..conftest import tiny_params

CUDA = torch.device("cuda", 0)  # a device object only: nothing here touches a GPU
CPU = torch.device("cpu")


@pytest.fixture
def backend_flags(monkeypatch):
    """Put torch's global flags back as they were after the test."""
    saved = (
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cuda.matmul.allow_tf32,
        torch.are_deterministic_algorithms_enabled(),
    )
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[:2]
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved[2:4]
    torch.use_deterministic_algorithms(saved[4])


def test_deterministic_sets_the_cuda_kernels_and_false_the_fast_ones(backend_flags):
    apply_determinism(True, CUDA)
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    apply_determinism(False, CUDA)
    assert torch.backends.cudnn.benchmark and not torch.backends.cudnn.deterministic
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
    assert not torch.are_deterministic_algorithms_enabled()


def test_on_cpu_it_changes_nothing_and_model_export_still_works(backend_flags):
    before = torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()
    apply_determinism(True, CPU)
    assert (torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled()) == before
    # MLflow's model logging runs torch.export in the same process as training
    torch.export.export(torch.nn.Linear(2, 2), (torch.ones(1, 2),))


def _cfg(**train):
    params = tiny_params()
    params["train"].update({"precision": "fp32", "channels_last": False, **train})
    return build_config(params)


def test_cuda_graphs_are_offered_only_without_accumulation_and_for_one_rank():
    assert "reduce-overhead" in _choices(_cfg(compile="auto"), CUDA, 1)["compile"]
    assert (
        "reduce-overhead"
        not in _choices(_cfg(compile="auto", grad_accum_steps=2), CUDA, 1)["compile"]
    )
    assert "reduce-overhead" not in _choices(_cfg(compile="auto"), CUDA, 2)["compile"]
    with pytest.raises(TrainingError, match=r"reduce-overhead.*train.grad_accum_steps=2"):
        _choices(_cfg(compile="reduce-overhead", grad_accum_steps=2), CUDA, 1)
    with pytest.raises(TrainingError, match="CUDA graphs need one rank, not 2"):
        _choices(_cfg(compile="reduce-overhead"), CUDA, 2)


def test_plan_problems_name_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    graphs = StepPlan("fp32", False, "reduce-overhead", True)
    assert plan_problems(graphs, CUDA, 1, 1) == []
    assert len(plan_problems(graphs, CUDA, 2, 4)) == 2  # several ranks, accumulation
    assert plan_problems(StepPlan("bf16"), CPU, 1, 1) == [
        "bf16 autocast is not supported at speed on cpu"
    ]


def test_a_gpu_checkpoints_plan_is_not_kept_on_cpu_or_under_ddp(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    gpu_plan = {**StepPlan("bf16", True, "reduce-overhead", True).as_dict(), "device": "cuda"}
    plan, why = _resumed_plan({**gpu_plan, "world_size": 1}, CPU, 1, 1)
    assert plan is None and "chosen for cuda, this run is on cpu" in why
    plan, why = _resumed_plan({**gpu_plan, "precision": "fp32", "world_size": 1}, CUDA, 2, 1)
    assert plan is None and "CUDA graphs need one rank" in why
    kept, _ = _resumed_plan({**StepPlan("fp32", True).as_dict(), "device": "cpu"}, CPU, 2, 1)
    assert kept is not None and kept.channels_last and kept.how == "checkpoint"
    # through choose(): a warning, and a plan for this device (fp32, no graphs, no fused)
    monkeypatch.setattr(autotune, "time_candidates", lambda *a, **k: pytest.fail("probed"))
    cfg = _cfg(compile="auto", fused_adam="auto", precision="auto")
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        plan = choose(cfg, CPU, 32, tmp_path / "c.json", 1, {**gpu_plan, "world_size": 1})
    assert (plan.precision, plan.compile, plan.fused_adam) == ("fp32", "none", False)
    assert "does not fit this run" in caplog.text


def test_a_cpu_with_bf16_units_probes_bf16(tmp_path, monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: True)
    cfg = _cfg(precision="auto", channels_last=False, autotune_cache=str(tmp_path / "c.json"))
    assert _choices(cfg, CPU, 1)["precision"] == ["fp32", "bf16"]
    rates = autotune.time_candidates(
        cfg, CPU, 16, [StepPlan("fp32"), StepPlan("bf16")], rounds=1, round_seconds=0.05
    )
    assert set(rates) == {StepPlan("fp32"), StepPlan("bf16")}  # both really ran
    assert all(r > 0 for r in rates.values())


def test_hitting_dynamos_recompile_limit_is_a_warning_not_a_silent_eager_step(monkeypatch, caplog):
    watch = step.CompileWatch(StepPlan(compile="default"))
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        double = torch.compile(lambda x: x * 2, backend="eager", dynamic=False)
        double(torch.ones(3))
        watch.first_step_done()
        double(torch.ones(2))  # another shape, past the limit of one entry: runs eager
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        watch.check("a test")
    assert "hit its recompile limit by a test" in caplog.text and "EAGER" in caplog.text
    torch._dynamo.reset()
