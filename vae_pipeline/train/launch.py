"""`vae-pipeline train` (and a sharded `evaluate`) launch torchrun themselves; the worker
modules are `vae_pipeline.worker` (training) and `vae_pipeline.eval_worker` (evaluation).

The effective config (params.yaml plus overrides) is written to `<out_dir>/config.yaml` and every
rank reads that file, so all ranks, and a torchrun restart, train with the same values.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from vae_pipeline.config import Config, save_config
from vae_pipeline.config.sections import TrainConfig
from vae_pipeline.signals import with_parent
from vae_pipeline.train import checkpoint
from vae_pipeline.train.resume import describe_checkpoint
from vae_pipeline.train.step import TrainingError

log = logging.getLogger(__name__)

WORKER_MODULE = "vae_pipeline.worker"
EVAL_WORKER_MODULE = "vae_pipeline.eval_worker"


def torchrun_env() -> dict[str, str]:
    """The environment for torchrun: ours plus one setting restarts need.

    By default torchrun's workers share the rendezvous TCPStore, and after a restart
    (`--max-restarts`) a gloo/NCCL group can read the previous attempt's addresses from it and
    fail to connect (pytorch/pytorch#135712; seen here with gloo). A store of their own per
    attempt avoids that; a value you export yourself wins.
    """
    return {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", **os.environ}


def rendezvous_args(tc: TrainConfig) -> list[str]:
    """torchrun's topology flags from train.*: `--standalone` on one node unless an endpoint
    is given, else a c10d rendezvous that every node joins with the same command."""
    if tc.nnodes == 1 and tc.rdzv_endpoint is None:
        args = ["--standalone", "--nnodes=1"]
    else:
        args = [
            f"--nnodes={tc.nnodes}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={tc.rdzv_endpoint}", f"--rdzv-id={tc.rdzv_id}",
        ]  # fmt: skip
    return [*args, f"--max-restarts={tc.max_restarts}"]


def torchrun_command(
    config_path: Path,
    nproc_per_node: int,
    worker_args: list[str] = (),
    module: str = WORKER_MODULE,
    topology: list[str] = ("--standalone", "--nnodes=1"),
) -> list[str]:
    """`python -m torch.distributed.run <topology> ... -m <module> --params ... <args>`"""
    return [
        sys.executable, "-m", "torch.distributed.run",
        *topology, f"--nproc-per-node={nproc_per_node}",
        "-m", module, "--params", str(config_path), *worker_args,
    ]  # fmt: skip


def run_torchrun(cmd: list[str], workdir: Path, env: dict | None = None) -> int:
    """Run torchrun and wait; if waiting is interrupted (Ctrl-C, a Prefect task timeout or
    cancellation), stop torchrun and its ranks before re-raising, so no rank outlives the step.

    torchrun runs in its own process group; SIGTERM lets it stop its ranks (it forwards the
    signal), SIGKILL to the whole group follows after STOP_GRACE_S.
    """
    # its own session (a stop reaches its whole group), and it dies with this process even
    # when this one is SIGKILLed (PR_SET_PDEATHSIG: torchrun then stops its ranks)
    proc = subprocess.Popen(with_parent(cmd), cwd=workdir, env=env, start_new_session=True)
    try:
        while True:  # short waits: an exception raised into this thread is seen within 0.5 s
            try:
                return proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                continue
    except BaseException:
        stop_process_group(proc)
        raise


STOP_GRACE_S = 30.0


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM to `proc`'s process group, then SIGKILL to the group if it is still there."""
    for sig, grace in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        if sig == signal.SIGTERM:  # torchrun is gone; make sure no rank lingers
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.warning("stopped torchrun (pid %d) and its ranks", proc.pid)
        return


def launch(
    cfg: Config, out_dir: Path, workdir: Path = Path("."), worker_args: list[str] = ()
) -> Path:
    """Run training under torchrun: `train.nproc_per_node` ranks on this node, of
    `train.nnodes` nodes (c10d rendezvous at `train.rdzv_endpoint`), restarted up to
    `train.max_restarts` times; returns model.pt's path (written by global rank 0).

    torchrun sets OMP_NUM_THREADS=1 per rank when it starts more than one, so ranks do not
    oversubscribe the cores; export it yourself to choose otherwise.
    """
    out_dir = Path(out_dir)
    tc = cfg.train
    # One file per node (nodes may share out_dir), written whole before torchrun reads it.
    node = f"-{os.uname().nodename}-{os.getpid()}" if tc.nnodes > 1 else ""
    config_path = save_config(cfg, (workdir / out_dir) / f"config{node}.yaml")
    cmd = torchrun_command(
        config_path.resolve(),
        tc.nproc_per_node,
        ["--out-dir", str(out_dir), *worker_args],
        topology=rendezvous_args(tc),
    )
    log.info(
        "launching %d rank(s) on this node of %d: %s",
        tc.nproc_per_node,
        tc.nnodes,
        " ".join(cmd[2:]),
    )
    try:
        returncode = run_torchrun(cmd, workdir, torchrun_env())
    finally:
        if node:
            config_path.unlink(missing_ok=True)
    if returncode != 0:
        raise TrainingError(
            f"training failed (torchrun exit code {returncode}); the rank's error is "
            f"printed above. {restart_hint(workdir / out_dir)}"
        )
    return workdir / out_dir / "model.pt"


def restart_hint(out_dir: Path) -> str:
    """What a restart into `out_dir` would do, as the checkpoint there says (not a guess)."""
    path = Path(out_dir) / "checkpoint.pt"
    if not path.is_file():
        return f"No checkpoint was written in {out_dir}: a restart starts over."
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        return str(exc)
    return f"A restart resumes from {path} ({describe_checkpoint(state)})."


def launch_evaluation(cfg: Config, model_ref: str, workdir: Path = Path(".")) -> None:
    """Evaluate `model_ref` under torchrun with `evaluate.nproc_per_node` ranks, sharding the
    test examples; rank 0 writes the reports (the same numbers as one process)."""
    with tempfile.TemporaryDirectory(prefix="vae-eval-") as tmp:
        config_path = save_config(cfg, Path(tmp) / "config.yaml")
        cmd = torchrun_command(
            config_path, cfg.evaluate.nproc_per_node, ["--model", model_ref], EVAL_WORKER_MODULE
        )
        log.info("launching %d evaluation rank(s)", cfg.evaluate.nproc_per_node)
        returncode = run_torchrun(cmd, workdir)
    if returncode != 0:
        raise RuntimeError(
            f"evaluation failed (torchrun exit code {returncode}); the rank's error is "
            "printed above"
        )
