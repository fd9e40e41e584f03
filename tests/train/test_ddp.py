"""Real multi-process DDP: torchrun with gloo on CPU, 2 ranks."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_pipeline.config import build_config, save_config
from vae_pipeline.data import prepare, snapshot_source
from vae_pipeline.train import Trainer, load_model
from vae_pipeline.train.launch import launch

from ..conftest import tiny_params

HELPER = Path(__file__).with_name("ddp_ranks.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    cfg = build_config(tiny_params(train={"epochs": 2}))
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root, cfg


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_and_match_one_process(prepared):
    root, cfg = prepared
    config = save_config(cfg, root / "ddp.yaml")
    out = root / "ddp-run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(HELPER),
        str(config),
        str(out),
        str(root),
    ]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    weights = torch.load(out / "rank_weights.pt", weights_only=True)
    assert weights.shape[0] == 2
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)  # DDP keeps ranks in sync

    # Same global batch, seed and data in one process: the same training, up to float reduction
    # order (gloo sums the two half-batch gradients in another order than one big batch).
    single = Trainer(cfg, root / "single", workdir=root)
    history = single.fit()
    ddp_history = json.loads((out / "history.json").read_text())
    for a, b in zip(history, ddp_history, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    flat = torch.cat([p.detach().flatten() for p in single.model.parameters()])
    diff = (weights[0] - flat).abs()
    # Adam moves a weight by at most ~lr per step, and where a gradient is ~0 its sign is float
    # noise; so a weight can differ by up to 2 * lr * steps while the bulk agrees to 1e-6.
    steps = cfg.train.epochs * (cfg.data.limit // cfg.train.batch_size)
    assert diff.max() <= 2 * cfg.train.lr * steps
    assert diff.median() < 1e-6


@pytest.mark.slow
def test_launcher_runs_torchrun_and_rank0_writes_outputs(prepared):
    root, cfg = prepared
    model_path = launch(cfg, Path("launched"), root)
    assert model_path == root / "launched" / "model.pt"
    model, meta = load_model(model_path)
    assert meta["epochs"] == 2
    assert (root / "launched" / "config.yaml").is_file()
    assert sorted(p.name for p in (root / "launched").glob("*.pt")) == ["checkpoint.pt", "model.pt"]


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_step(prepared):
    root, cfg = prepared
    config = save_config(cfg, root / "ddp-nan.yaml")
    out = root / "ddp-nan"
    out.mkdir()
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(HELPER), str(config), str(out), str(root), "1:2",
    ]  # fmt: skip
    # Rank 1 alone sees a NaN at step 2; DDP's averaged gradient carries it to rank 0, and the
    # ranks agree through one all-reduce, so both stop (none hangs in a collective).
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    for rank in (0, 1):
        message = (out / f"error_rank{rank}.txt").read_text()
        assert "non-finite loss or gradient at epoch 1, step 2 " in message
        assert f"on rank {rank})" in message
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()
