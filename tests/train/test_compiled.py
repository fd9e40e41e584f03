"""The compiled training step on CPU (inductor, with g++): what CUDA runs compiled, CPU can
stand in for. The iwae objective with KL warm-up and gradient accumulation compiles once, and
the step probe's candidate is the trainer's graph (so the trainer's compile is a cache hit);
compiled DDP on 2 gloo ranks trains to the 1-rank weights."""

import subprocess

import pytest
import torch

from vae_pipeline.config import build_config, save_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train import autotune
from vae_pipeline.train.launch import torchrun_env
from vae_pipeline.train.step import CompileWatch
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params
from .test_ddp import HELPER, TORCHRUN
from .trajectory import assert_same_trajectory, flat

pytestmark = pytest.mark.slow  # inductor compiles take tens of seconds on 2 cores


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("compiled")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root


def _cfg(tmp_path, **train):
    params = tiny_params()
    params["train"].update({"autotune_cache": str(tmp_path / "plans.json"), **train})
    return build_config(params)


def test_iwae_warmup_and_accumulation_compile_once_and_share_the_probes_graph(
    prepared, tmp_path, monkeypatch
):
    torch._dynamo.reset()
    probed = []
    real = autotune.time_candidates

    def recording(*args, **kwargs):
        rates = real(*args, **kwargs)
        probed.extend(rates)
        return rates

    monkeypatch.setattr(autotune, "time_candidates", recording)
    cfg = _cfg(
        tmp_path,
        epochs=2,
        objective="iwae",
        iw_samples=2,
        kl_warmup_steps=4,  # beta changes at every step of the first epoch
        grad_accum_steps=2,
        compile=True,
        channels_last="auto",  # a probe: both layouts, compiled, on the trainer's own graph
    )
    trainer = Trainer(cfg, tmp_path / "run", workdir=prepared)
    assert trainer.plan.how == "probed" and trainer.plan.compile == "default"
    assert {p.compile for p in probed} == {"default"} and len(probed) == 2
    before = CompileWatch.graphs()
    history = trainer.fit()
    watch = trainer.compile_watch
    # the trainer's first step compiled nothing new: the probe's winner is its graph
    assert watch.first - before == 0
    # and nothing recompiled as beta rose 0 -> 1 over the micro-batches of 8 steps
    assert trainer.progress.global_step == 8 and trainer.kl_weight() == 1.0
    assert watch.graphs_since_first == 0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert history[1]["train_iwae_loss"] < history[0]["train_iwae_loss"] + 50


def test_a_recompile_is_logged_as_a_warning(prepared, tmp_path, caplog):
    """The watch is not silent: a step compiled for one shape, run on another, recompiles."""
    torch._dynamo.reset()
    cfg = _cfg(tmp_path, compile=True, channels_last=False)
    trainer = Trainer(cfg, tmp_path / "watch", workdir=prepared)
    x = torch.rand(8, 1, 32, 32)
    eps = torch.randn(8, 8)
    trainer.net(x, eps)
    trainer.compile_watch.first_step_done()
    trainer.net(x[:4].contiguous(), eps[:4].contiguous())  # another batch size: a new graph
    trainer.net(x[:3].contiguous(), eps[:3].contiguous())
    with caplog.at_level("WARNING", logger="vae_pipeline"):
        trainer.compile_watch.check("a test")
    assert trainer.compile_watch.graphs_since_first >= 1
    assert "recompiled" in caplog.text and "by a test" in caplog.text


def test_compiled_ddp_on_two_gloo_ranks_matches_one_compiled_rank(prepared, tmp_path):
    cfg = _cfg(tmp_path, epochs=1, compile=True, channels_last=False)
    single = Trainer(cfg, tmp_path / "one", workdir=prepared)
    start = flat(single.model.parameters())
    single.fit()
    config = save_config(cfg, tmp_path / "two.yaml")
    out = tmp_path / "two"
    out.mkdir()
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", str(HELPER), str(config), str(out)]
    result = subprocess.run(
        [*cmd, str(prepared)],
        cwd=prepared,
        capture_output=True,
        text=True,
        timeout=600,
        env=torchrun_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = torch.load(out / "rank_weights.pt", weights_only=True)  # (rank, parameters)
    assert ranks.shape[0] == 2
    torch.testing.assert_close(ranks[0], ranks[1], rtol=0, atol=0)  # DDP kept them in sync
    # the same trajectory: compiled kernels of another batch shape round differently from
    # the 1-rank run's, hence a tolerance (an unsynced or wrong gradient is far outside it)
    assert_same_trajectory(start, ranks[0], flat(single.model.parameters()), rel=1e-2)
