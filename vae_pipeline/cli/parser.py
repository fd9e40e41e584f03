"""The `vae-pipeline` argument parser: every subcommand, its flags and its --help."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from vae_pipeline import __version__

log = logging.getLogger(__name__)


CHAMPION_URI = "models:/{name}@champion"


# `vae-pipeline train` flags that mirror torchrun's; each is a shorthand for `--set KEY=VALUE`.
TRAIN_TOPOLOGY_FLAGS = (
    ("--nnodes", "train.nnodes", int),
    ("--nproc-per-node", "train.nproc_per_node", str),  # a number or auto
    ("--rdzv-endpoint", "train.rdzv_endpoint", str),
    ("--rdzv-id", "train.rdzv_id", str),
    ("--max-restarts", "train.max_restarts", int),
)


# `vae-pipeline ingest` flags, likewise shorthands for `--set KEY=VALUE`.
INGEST_FLAGS = (
    ("--source", "data.source", str),
    ("--remote", "data.remote", str),
    ("--on-bad-image", "data.on_bad_image", str),
)


def topology_overrides(args: argparse.Namespace) -> list[str]:
    """The train flags given, as overrides (applied after --set, so a flag wins)."""
    out = []
    for flag, key, _ in (*TRAIN_TOPOLOGY_FLAGS, *INGEST_FLAGS):
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is not None:
            out.append(f"{key}={value}")
    return out


def add_params_arguments(p: argparse.ArgumentParser) -> None:
    """--params and --set: every entry point (subcommands, the torchrun worker) takes them."""
    p.add_argument(
        "--params",
        type=Path,
        default=Path("params.yaml"),
        help="params file (default: params.yaml)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one param, e.g. --set train.epochs=1 (repeatable)",
    )


def add_error_dir_argument(p: argparse.ArgumentParser) -> None:
    """--error-dir, for the torchrun workers: where a rank writes its one-line error."""
    p.add_argument(
        "--error-dir",
        type=Path,
        default=None,
        help="write a pipeline error to DIR/rank<N>.txt for the launcher to report, instead "
        "of printing it (vae-pipeline's own launcher sets this)",
    )


def report_error(exc: BaseException, error_dir: Path | None, rank: int) -> None:
    """A rank's pipeline error: into `error_dir` for the launcher, else one line on stderr."""
    if error_dir is None:
        print(f"error: {exc}", file=sys.stderr)
        return
    Path(error_dir, f"rank{rank}.txt").write_text(" ".join(str(exc).split("\n")))


def _model_arg(p: argparse.ArgumentParser, default_help: str) -> None:
    p.add_argument(
        "--model",
        default=None,
        help=f"model.pt file, a train out dir, or an MLflow URI; default: {default_help}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vae-pipeline",
        description="Retrain, evaluate, register and promote convolutional VAEs.",
        epilog="Run `vae-pipeline COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"vae-pipeline {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_params_arguments(p)
        return p

    p = add(
        "ingest",
        "Snapshot a source (folder, .zip/.tar(.gz) archive, s3://bucket/prefix or fashion-mnist) "
        "into data.raw_dir and version it with DVC; prints the data version. Only new and "
        "changed files are fetched; unusable ones are listed in data/ingest_report.json.",
    )
    p.add_argument(
        "--source",
        default=None,
        help="sets data.source: a folder, an archive, s3://... or fashion-mnist",
    )
    p.add_argument("--remote", choices=("local", "s3"), default=None, help="sets data.remote")
    p.add_argument(
        "--on-bad-image", choices=("skip", "fail"), default=None, help="sets data.on_bad_image"
    )
    p.add_argument("--no-push", action="store_true", help="do not push to the DVC remote")
    add("prepare", "Decode the raw snapshot into uint8 train/val/test splits.")
    p = add(
        "train",
        "Train the ConvVAE under torchrun (train.nproc_per_node ranks per node). For several "
        "nodes, run the same command on each with --nnodes N --rdzv-endpoint HOST:PORT.",
    )
    p.add_argument("--out-dir", type=Path, default=None, help="default: train.out_dir")
    p.add_argument("--mlflow-run-id", default=None, help="log per-epoch metrics into this run")
    for flag, key, kind in TRAIN_TOPOLOGY_FLAGS:
        p.add_argument(flag, type=kind, default=None, help=f"sets {key} (see params.yaml)")
    p = add(
        "evaluate",
        "Evaluate a model on the test split: reports/metrics.json and PNG grids "
        "(sharded over evaluate.nproc_per_node torchrun ranks when > 1).",
    )
    _model_arg(p, "train.out_dir")
    p = add("register", "Log a trained model and its evaluation to MLflow and register it.")
    _model_arg(p, "train.out_dir")
    p = add("promote", "Apply the promotion gate to a registered version (moves `champion`).")
    p.add_argument("--version", dest="model_version", required=True, help="model version number")
    p = add("rollback", "Move `champion` back to `previous-champion` (or --to VERSION).")
    p.add_argument("--to", dest="to_version", default=None, help="version to restore")
    p.add_argument("--reason", required=True, help="why (recorded in the alias history)")
    p = add("history", "Every alias move (champion, challenger, previous-champion), oldest first.")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p = add(
        "lineage",
        "A version's lineage tags and the commands that reproduce it in a fresh clone; "
        "--restore writes its params file and data pointer back from its MLflow run.",
    )
    p.add_argument("model_version", metavar="VERSION", help="model version number")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--restore",
        action="store_true",
        help="write --params (params.yaml) and the data pointer (data/raw.dvc) as the version's "
        "run had them, for `dvc pull` and `dvc repro`",
    )
    p = add(
        "retrain",
        "Run the whole retrain flow (Prefect): ingest -> prepare -> train -> evaluate -> "
        "register -> promote. Steps that finished for the same inputs (data version, training "
        "params, code) are reused, so a re-run after a failure resumes where it failed.",
    )
    p.add_argument("--source", default=None, help="sets data.source for this run")
    p.add_argument(
        "--no-promote", action="store_true", help="register only; never move the champion"
    )
    p.add_argument("--force", action="store_true", help="redo every step (ignore the cache)")
    p = add(
        "monitor",
        "Score new images (monitor.source) with the champion and start a retrain on drift: "
        "their mean negative ELBO beyond +-monitor.threshold_nats of the champion's test set, "
        "or their latent codes distributed unlike the test images' (Prefect flow).",
    )
    p.add_argument("--source", default=None, help="sets monitor.source: folder, archive, s3://")
    p.add_argument(
        "--always", action="store_true", help="retrain whatever the shift (it is still measured)"
    )
    p.add_argument(
        "--retrain-deployment",
        default=None,
        metavar="FLOW/DEPLOYMENT",
        help="start the retrain through this deployment (e.g. retrain/retrain) instead of here",
    )
    p.add_argument(
        "--no-retrain",
        action="store_true",
        help="measure only: report whether a retrain would start, start none",
    )
    p = add(
        "deploy",
        "Render prefect.yaml from params (orchestration.*, monitor.*) and create the retrain "
        "and monitor deployments with their schedules on orchestration.work_pool (needs "
        "PREFECT_API_URL). Then run a worker: prefect worker start --pool POOL.",
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="only check that prefect.yaml matches params (exit 1 if not); deploys nothing",
    )
    p.add_argument(
        "--workdir",
        default=None,
        metavar="DIR",
        help="runs work in DIR (data, models, DVC and Prefect state) with this folder's params "
        "file, instead of in the folder deployed from (a container's state volume)",
    )
    p = add(
        "sample",
        "Generate images: decoder means of z ~ N(0, temperature^2 I), as a PNG grid.",
    )
    _model_arg(p, "the champion")
    p.add_argument("--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    p.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="scale of the prior's standard deviation (default 1; < 1 = more typical images)",
    )
    p.add_argument("--out", type=Path, default=Path("samples.png"), help="PNG path")
    p = add(
        "interpolate",
        "Decode the straight line between two images' latent means, as a PNG strip "
        "(first image, --steps decoded points, second image).",
    )
    _model_arg(p, "the champion")
    p.add_argument("first", metavar="A", help="an image file, or SPLIT:ROW (e.g. test:0)")
    p.add_argument("second", metavar="B", help="an image file, or SPLIT:ROW (e.g. test:1)")
    p.add_argument("--steps", type=int, default=10, help="decoded points, ends included (10)")
    p.add_argument("--out", type=Path, default=Path("interpolation.png"), help="PNG path")
    for name, what in (
        (
            "encode",
            "the posterior's means and log-variances (mu_0.., logvar_0..), one row per image "
            "with its source path and label",
        ),
        (
            "score",
            "anomaly scores: negative ELBO and negative IW bound (K = evaluate.iw_samples), "
            "the image's complexity and floor, in nats, and is_anomaly by anomaly.score "
            "(typicality by default) at the threshold stored with a registered model (or "
            "--threshold)",
        ),
    ):
        p = add(name, f"Images -> {what}; CSV or Parquet by the --out suffix.")
        _model_arg(p, "the champion")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument(
            "--images", type=Path, help="a folder of images (sub-folder names are labels)"
        )
        src.add_argument("--split", choices=("train", "val", "test"), help="a prepared split")
        p.add_argument("--out", type=Path, required=True, help="a .csv or .parquet path")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        metavar="VALUE",
        help="flag images whose anomaly.score is above this (nats; -log p for typicality, "
        "which also needs the model's stored reference; default: the model's stored threshold)",
    )
    p = sub.choices["encode"]
    p.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="PNG",
        help="also draw the latent means' first two principal components, coloured by label",
    )
    return parser
