"""Real multi-process DDP: torchrun with gloo on CPU, 2 ranks, on one node or on two "nodes"
(two torchrun agents meeting at a c10d rendezvous on 127.0.0.1); a rank SIGKILLed mid-epoch."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_pipeline.config import build_config, save_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.pipeline import train as pipeline_train
from vae_pipeline.tracking import start_run
from vae_pipeline.train.checkpoint import load_model
from vae_pipeline.train.launch import torchrun_env
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params

HELPER = Path(__file__).with_name("ddp_ranks.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    # 4 steps per epoch; a mid-epoch checkpoint at global steps 3 and 6
    cfg = build_config(tiny_params(train={"epochs": 2, "checkpoint_every": 3}))
    snapshot_source(cfg, root)
    prepare(cfg, root)
    return root, cfg


def _run_ranks(root: Path, cfg, name: str, *torchrun_args: str, fault: str = ""):
    config = save_config(cfg, root / f"{name}.yaml")
    out = root / name
    out.mkdir()
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", *torchrun_args]
    cmd += [str(HELPER), str(config), str(out), str(root)] + ([fault] if fault else [])
    # every warning shown once where it is raised (DeprecationWarning too)
    env = {**torchrun_env(), "PYTHONWARNINGS": "default"}
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=300, env=env)
    return out, result


@pytest.fixture(scope="module")
def two_ranks(prepared):
    """An uninterrupted 2-rank run: its out dir, every rank's final weights, its stderr."""
    root, cfg = prepared
    out, result = _run_ranks(root, cfg, "ddp-run")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, torch.load(out / "rank_weights.pt", weights_only=True), result.stderr


@pytest.fixture(scope="module")
def one_process(prepared):
    """The same global batch, seed and data in one process (no DDP)."""
    root, cfg = prepared
    single = Trainer(cfg, root / "single", workdir=root)
    history = single.fit()
    return history, torch.cat([p.detach().flatten() for p in single.model.parameters()])


def _assert_same_training(cfg, history, weights, ref_history, ref_weights) -> None:
    """Same training up to float reduction order (gloo sums the per-rank gradients in another
    order than one big batch)."""
    for a, b in zip(ref_history, history, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_loss"):
            # relative to the loss (hundreds of nats): the KL is a small term (under 1 nat
            # after 2 epochs here), and its float noise is that of the whole loss
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6 * a["train_loss"]), key
    diff = (weights - ref_weights).abs()
    # Adam moves a weight by at most ~lr per step, and where a gradient is ~0 its sign is float
    # noise; so a weight can differ by up to 2 * lr * steps while the bulk agrees to 1e-6.
    steps = cfg.train.epochs * (cfg.data.limit // cfg.train.batch_size)
    assert diff.max() <= 2 * cfg.train.lr * steps
    assert diff.median() < 1e-6


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_and_match_one_process(prepared, two_ranks, one_process):
    _, cfg = prepared
    out, weights, _ = two_ranks
    assert weights.shape[0] == 2
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)  # DDP keeps ranks in sync
    ddp_history = json.loads((out / "history.json").read_text())
    _assert_same_training(cfg, ddp_history, weights[0], *one_process)


def test_ddp_ranks_print_no_deprecation_warning_and_keep_the_mask_rank_local(two_ranks):
    """torch deprecated `broadcast_buffers` (2.13); its replacement alone would broadcast the
    padding mask at init. DDP ignores the mask instead: no warning, nothing synced."""
    out, _, stderr = two_ranks
    warned = [line for line in stderr.splitlines() if "Warning:" in line]
    assert not [w for w in warned if "FutureWarning" in w or "DeprecationWarning" in w], warned
    ignored = json.loads((out / "ddp_ignored.json").read_text())  # written by every rank
    assert ignored == {"0": ["vae.pixel_mask"], "1": ["vae.pixel_mask"]}


@pytest.mark.slow
def test_a_rank_killed_mid_epoch_is_restarted_and_ends_with_the_same_weights(prepared, two_ranks):
    root, cfg = prepared
    # Rank 1 dies by SIGKILL at global step 7 (epoch 2, step 3), after the checkpoint of step 6
    out, result = _run_ranks(root, cfg, "ddp-killed", "--max-restarts=1", fault="kill:1:7")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed (exitcode: -9) local_rank: 1" in result.stderr  # SIGKILL: it did die
    assert "resumed from" in result.stderr and "at epoch 2, step 2" in result.stderr
    weights = torch.load(out / "rank_weights.pt", weights_only=True)
    torch.testing.assert_close(weights, two_ranks[1], rtol=0, atol=0)  # bit for bit
    history = json.loads((out / "history.json").read_text())
    reference = json.loads((two_ranks[0] / "history.json").read_text())
    for a, b in zip(reference, history, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-12)
        assert a["val_loss"] == b["val_loss"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_at_a_c10d_rendezvous_train_like_one_process(prepared, one_process):
    root, cfg = prepared
    params = save_config(cfg, root / "nodes.yaml")
    port = _free_port()
    # The same command on each "node", as a user runs it on two machines; gradient
    # accumulation (2 micro-batches per rank, DDP's no_sync) on top must not change the result.
    cmd = [
        sys.executable, "-m", "vae_pipeline.cli", "train", "--params", str(params),
        "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--rdzv-id", "nodes-test", "--set", "train.grad_accum_steps=2", "--out-dir", "nodes",
    ]  # fmt: skip
    env = {**torchrun_env(), "PYTHONUNBUFFERED": "1"}
    nodes = [
        subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [node.communicate(timeout=300) for node in nodes]
    for node, (_, err) in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, err.decode()[-3000:]
    logs = b"".join(err for _, err in outputs).decode()
    assert "--nnodes=2" in logs and "--rdzv-backend=c10d" in logs
    assert "world size 2" in logs  # one rank on each node
    model, _ = load_model(root / "nodes" / "model.pt")
    history = json.loads((root / "nodes" / "history.json").read_text())
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    _assert_same_training(cfg, history, weights, *one_process)
    assert not list((root / "nodes").glob("config-*.yaml"))  # per-node copies cleaned up


@pytest.mark.slow
def test_launcher_writes_outputs_from_rank0_into_one_mlflow_run(prepared):
    root, cfg = prepared
    uri = tracking_uri(cfg, root)
    run_id = start_run(cfg, uri, root, "ddp-test", {})
    model_path = pipeline_train(cfg, root, Path("launched"), run_id)
    assert model_path == root / "launched" / "model.pt"
    model, meta = load_model(model_path)
    assert meta["epochs"] == 2
    assert (root / "launched" / "config.yaml").is_file()
    assert sorted(p.name for p in (root / "launched").glob("*.pt")) == ["checkpoint.pt", "model.pt"]
    # Rank 0 alone logged, into the run it was given: no per-rank runs, one point per epoch
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs(
        [client.get_experiment_by_name(cfg.registry.experiment).experiment_id]
    )
    assert [r.info.run_id for r in runs] == [run_id]
    history = client.get_metric_history(run_id, "train_loss")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2]
    expected = json.loads((root / "launched" / "history.json").read_text())
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(
        [h["train_loss"] for h in expected]
    )


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_step(prepared):
    root, cfg = prepared
    # Rank 1 alone sees a NaN at step 2; DDP's averaged gradient carries it to rank 0, and the
    # ranks agree through one all-reduce, so both stop (none hangs in a collective).
    out, result = _run_ranks(root, cfg, "ddp-nan", fault="nan:1:2")
    assert result.returncode != 0
    for rank in (0, 1):
        message = (out / f"error_rank{rank}.txt").read_text()
        assert "non-finite loss or gradient at epoch 1, step 2 " in message
        assert f"on rank {rank})" in message
    assert not (out / "checkpoint.pt").exists() and not (out / "model.pt").exists()


@pytest.mark.slow
def test_a_rank_error_reaches_the_user_as_one_line_without_tracebacks(prepared):
    """`vae-pipeline train` (2 ranks) restarted on a truncated checkpoint.pt: the ranks' error
    names the file, in one line that says where torchrun's own log is; no launcher or rank
    traceback is printed (torchrun's FAILED block is in that log)."""
    root, cfg = prepared
    save_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 1})}),
                root / "faults.yaml")  # fmt: skip
    cli = [sys.executable, "-m", "vae_pipeline.cli", "train", "--params", "faults.yaml"]
    cli += ["--out-dir", "faulty"]
    first = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    path = root / "faulty" / "checkpoint.pt"
    good = torch.load(path, weights_only=True)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    errors = _one_error_line([*cli, "--set", "train.epochs=2"], root)
    assert str(Path("faulty") / "checkpoint.pt") in errors and "cannot be read" in errors
    assert "torchrun's log: faulty/torchrun.log" in errors
    assert "Root Cause" in (root / "faulty" / "torchrun.log").read_text()
    good["model"]["decoder_input.bias"][3] = float("inf")  # a finished run's weights, planted
    torch.save(good, path)
    errors = _one_error_line(cli, root)
    assert str(Path("faulty") / "checkpoint.pt") in errors and "non-finite values" in errors
    assert "Move it aside" in errors


def _one_error_line(cli: list[str], root: Path) -> str:
    """Run the CLI; it must fail with exactly one error line and no traceback: that line."""
    again = subprocess.run(cli, cwd=root, capture_output=True, text=True, timeout=300)
    output = again.stdout + again.stderr
    assert again.returncode == 1, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    errors = [line for line in again.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, output[-3000:]
    assert errors[0].startswith("vae-pipeline train: error: ")
    return errors[0]
