"""`vae-pipeline train` (and a sharded `evaluate`) launch torchrun themselves; the worker
modules are `vae_pipeline.worker` (training) and `vae_pipeline.eval_worker` (evaluation).

The effective config (params.yaml plus overrides) is written to `<out_dir>/config.yaml` and every
rank reads that file, so all ranks, and a torchrun restart, train with the same values.

torchrun runs through `vae_pipeline.agent`, which keeps the agent's own log (and its failure
traceback) in `<out_dir>/torchrun.log`. A rank that stops on one of the pipeline's errors writes
its message into a folder the launcher gives it; the launcher raises that message, naming the
log, so the user reads one line. A rank that crashed prints its own traceback, and the launcher
says so.
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
from vae_pipeline.train.distributed import ranks_per_node
from vae_pipeline.train.resume import describe_checkpoint
from vae_pipeline.train.step import TrainingError

log = logging.getLogger(__name__)

WORKER_MODULE = "vae_pipeline.worker"
EVAL_WORKER_MODULE = "vae_pipeline.eval_worker"
AGENT_MODULE = "vae_pipeline.agent"


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


def agent_command(cmd: list[str], log_path: Path) -> list[str]:
    """A `torchrun_command` run by `vae_pipeline.agent`, its own log in `log_path`."""
    head = [sys.executable, "-m", "torch.distributed.run"]
    if cmd[: len(head)] != head:
        raise ValueError(f"not a torchrun command: {cmd[:3]}")
    return [sys.executable, "-m", AGENT_MODULE, "--log", str(log_path), "--", *cmd[len(head) :]]


def reported_errors(error_dir: Path) -> list[str]:
    """The messages that ranks wrote into `error_dir` (`rank<N>.txt`), lowest rank first."""
    files = sorted(Path(error_dir).glob("rank*.txt"), key=lambda f: int(f.stem[4:] or 0))
    return [f"{f.read_text().strip()} (rank {f.stem[4:]})" for f in files if f.read_text().strip()]


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
    nproc = ranks_per_node(tc.nproc_per_node, tc.device)
    # One file per node (nodes may share out_dir), written whole before torchrun reads it.
    node = f"-{os.uname().nodename}-{os.getpid()}" if tc.nnodes > 1 else ""
    config_path = save_config(cfg, (workdir / out_dir) / f"config{node}.yaml")
    log_path = workdir / out_dir / f"torchrun{node}.log"
    with tempfile.TemporaryDirectory(prefix="vae-rank-errors-") as errors:
        cmd = torchrun_command(
            config_path.resolve(),
            nproc,
            ["--out-dir", str(out_dir), "--error-dir", errors, *worker_args],
            topology=rendezvous_args(tc),
        )
        log.info(
            "launching %d rank(s) on this node of %d: %s",
            nproc,
            tc.nnodes,
            " ".join(cmd[2:]),
        )
        try:
            returncode = run_torchrun(
                agent_command(cmd, log_path.resolve()), workdir, torchrun_env()
            )
        finally:
            if node:
                config_path.unlink(missing_ok=True)
        reported = reported_errors(Path(errors))
    if returncode != 0:
        message = failure_message("training", returncode, reported, log_path)
        raise TrainingError(
            message if reported else f"{message}. {restart_hint(workdir / out_dir)}"
        )
    return workdir / out_dir / "model.pt"


def failure_message(what: str, returncode: int, reported: list[str], log_path: Path) -> str:
    """One line: the first rank's own error when one reported it, else that a rank crashed
    (its traceback is above); with where the agent's log is."""
    if reported:
        return f"{reported[0]} (torchrun's log: {log_path})"
    return (
        f"{what} failed (torchrun exit code {returncode}): a rank crashed or was stopped; its "
        f"traceback, if it printed one, is above (torchrun's log: {log_path})"
    )


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
    log_path = workdir / cfg.evaluate.reports_dir / "torchrun.log"
    with tempfile.TemporaryDirectory(prefix="vae-eval-") as tmp:
        config_path = save_config(cfg, Path(tmp) / "config.yaml")
        errors = Path(tmp, "errors")
        errors.mkdir()
        cmd = torchrun_command(
            config_path,
            cfg.evaluate.nproc_per_node,
            ["--model", model_ref, "--error-dir", str(errors)],
            EVAL_WORKER_MODULE,
        )
        log.info("launching %d evaluation rank(s)", cfg.evaluate.nproc_per_node)
        returncode = run_torchrun(agent_command(cmd, log_path.resolve()), workdir)
        reported = reported_errors(errors)
    if returncode != 0:
        raise TrainingError(failure_message("evaluation", returncode, reported, log_path))
