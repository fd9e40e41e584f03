"""`vae-pipeline train` (and a sharded `evaluate`) launch torchrun themselves; the worker
modules are `vae_pipeline.worker` (training) and `vae_pipeline.eval_worker` (evaluation).

The effective config (params.yaml plus overrides) is written to `<out_dir>/config.yaml` and every
rank reads that file, so all ranks, and a torchrun restart, train with the same values.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from pathlib import Path

from vae_pipeline.config import Config, save_config
from vae_pipeline.train.trainer import TrainingError

log = logging.getLogger(__name__)

WORKER_MODULE = "vae_pipeline.worker"
EVAL_WORKER_MODULE = "vae_pipeline.eval_worker"


def torchrun_command(
    config_path: Path,
    nproc_per_node: int,
    worker_args: list[str] = (),
    module: str = WORKER_MODULE,
) -> list[str]:
    """`python -m torch.distributed.run --standalone ... -m <module> --params ... <args>`"""
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", "--nnodes=1", f"--nproc_per_node={nproc_per_node}",
        "-m", module, "--params", str(config_path), *worker_args,
    ]  # fmt: skip


def launch(
    cfg: Config, out_dir: Path, workdir: Path = Path("."), worker_args: list[str] = ()
) -> Path:
    """Run training under torchrun with `train.nproc_per_node` ranks; returns model.pt's path.

    torchrun sets OMP_NUM_THREADS=1 per rank when it starts more than one, so ranks do not
    oversubscribe the cores; export it yourself to choose otherwise.
    """
    out_dir = Path(out_dir)
    config_path = save_config(cfg, (workdir / out_dir) / "config.yaml")
    cmd = torchrun_command(
        config_path.resolve(), cfg.train.nproc_per_node, ["--out-dir", str(out_dir), *worker_args]
    )
    log.info("launching %d rank(s): %s", cfg.train.nproc_per_node, " ".join(cmd[2:]))
    result = subprocess.run(cmd, cwd=workdir)
    if result.returncode != 0:
        raise TrainingError(
            f"training failed (torchrun exit code {result.returncode}); the rank's error is "
            "printed above. A restart resumes from the last checkpoint in " + str(out_dir)
        )
    return workdir / out_dir / "model.pt"


def launch_evaluation(cfg: Config, model_ref: str, workdir: Path = Path(".")) -> None:
    """Evaluate `model_ref` under torchrun with `evaluate.nproc_per_node` ranks, sharding the
    test examples; rank 0 writes the reports (the same numbers as one process)."""
    with tempfile.TemporaryDirectory(prefix="vae-eval-") as tmp:
        config_path = save_config(cfg, Path(tmp) / "config.yaml")
        cmd = torchrun_command(
            config_path, cfg.evaluate.nproc_per_node, ["--model", model_ref], EVAL_WORKER_MODULE
        )
        log.info("launching %d evaluation rank(s)", cfg.evaluate.nproc_per_node)
        result = subprocess.run(cmd, cwd=workdir)
    if result.returncode != 0:
        raise RuntimeError(
            f"evaluation failed (torchrun exit code {result.returncode}); the rank's error is "
            "printed above"
        )
