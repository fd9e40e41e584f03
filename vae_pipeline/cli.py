"""`vae-pipeline`: thin subcommands over vae_pipeline.pipeline.

Every subcommand reads params.yaml (--params), takes `--set section.key=value` overrides and
rejects an invalid value, naming the field, before doing any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from vae_pipeline import __version__
from vae_pipeline.config import Config, ConfigError, apply_quiet_offline_defaults, load_config
from vae_pipeline.logs import setup_logging
from vae_pipeline.signals import exit_on_sigterm

log = logging.getLogger("vae_pipeline.cli")

CHAMPION_URI = "models:/{name}@champion"

# `vae-pipeline train` flags that mirror torchrun's; each is a shorthand for `--set KEY=VALUE`.
TRAIN_TOPOLOGY_FLAGS = (
    ("--nnodes", "train.nnodes", int),
    ("--nproc-per-node", "train.nproc_per_node", int),
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
            "anomaly scores in nats: negative ELBO and negative IW bound (K = "
            "evaluate.iw_samples), and is_anomaly by the threshold stored with a registered "
            "model (or --threshold)",
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
        metavar="NATS",
        help="flag images whose anomaly.score is above this (default: the model's stored one)",
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


# --- commands ----------------------------------------------------------------------------------


def cmd_ingest(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(pipeline.ingest(cfg, push=not args.no_push))


def cmd_prepare(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(json.dumps(pipeline.prepare_data(cfg)["counts"]))


def cmd_train(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    print(pipeline.train(cfg, out_dir=args.out_dir, run_id=args.mlflow_run_id))


def cmd_evaluate(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    metrics = pipeline.evaluate_model(cfg, args.model or cfg.train.out_dir)
    print(json.dumps(metrics, indent=2))


def cmd_register(cfg: Config, args) -> None:
    from vae_pipeline import pipeline, tracking, versioning
    from vae_pipeline.config import tracking_uri
    from vae_pipeline.train.checkpoint import load

    model_dir = Path(args.model or cfg.train.out_dir)
    weights = model_dir / "model.pt" if model_dir.is_dir() else model_dir
    metrics_path = Path(cfg.evaluate.reports_dir) / "metrics.json"
    if not metrics_path.is_file():
        raise FileNotFoundError(f"{metrics_path} not found: run `vae-pipeline evaluate` first")
    metrics = json.loads(metrics_path.read_text())
    meta = load(weights)
    uri = tracking_uri(cfg)
    run_id = tracking.start_run(
        cfg,
        uri,
        Path("."),
        "register",
        {"data_version": str(meta.get("data_version")), "git_commit": versioning.git_commit()},
    )
    version = pipeline.register(cfg, run_id, weights, metrics)
    tracking.finish_run(uri, run_id)
    print(version)


def cmd_promote(cfg: Config, args) -> None:
    from vae_pipeline import pipeline

    decision = pipeline.promote(cfg, args.model_version)
    print(json.dumps(decision.__dict__, indent=2))


def _registry_client(cfg: Config):
    from vae_pipeline.config import tracking_uri
    from vae_pipeline.tracking import client_for

    return client_for(tracking_uri(cfg))


def cmd_rollback(cfg: Config, args) -> None:
    from vae_pipeline import registry
    from vae_pipeline.config import tracking_uri

    event = registry.rollback(cfg, tracking_uri(cfg), args.reason, args.to_version)
    print(
        f"{cfg.registry.model_name}: champion v{event['from_champion']} -> v{event['version']} "
        f"(rollback #{event['seq']}: {event['reason']})"
    )


def cmd_history(cfg: Config, args) -> None:
    from vae_pipeline import registry

    events = registry.history(_registry_client(cfg), cfg.registry.model_name)
    if args.json:
        for event in events:
            print(json.dumps(event))
        return
    if not events:
        print(f"{cfg.registry.model_name}: no alias moves yet")
    for e in events:
        metric = e.get("metric", "iw_nll")
        cand, champ = e.get("candidate") or {}, e.get("champion") or {}
        sides = f"v{cand.get('version')} {metric} {_num(cand.get(metric))}"
        if champ:
            sides += f" | champion v{champ.get('version')} {metric} {_num(champ.get(metric))}"
        print(
            f"#{e['seq']:<3} {e['at']}  {e['action']:<8} {e['alias']:<10} -> v{e['version']:<4} "
            f"by {e.get('by')}\n      {sides}\n      why: {e.get('reason')}"
        )


def _num(value) -> str:
    try:
        return f"{float(value):.3f}"
    except (TypeError, ValueError):
        return "?"


def cmd_lineage(cfg: Config, args) -> None:
    from vae_pipeline import registry

    client = _registry_client(cfg)
    if args.restore:
        from vae_pipeline.lineage import restore

        name = cfg.registry.model_name
        for line in restore(client, name, args.model_version, Path("."), Path(args.params)):
            print(line)
        return
    info = registry.lineage(client, cfg.registry.model_name, args.model_version)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    print(f"{info['name']} v{info['version']}  aliases: {', '.join(info['aliases']) or '-'}")
    print(f"  run {info['run_id']}  source {info['source']}")
    for key in sorted(info["tags"]):
        if not key.startswith("gate_"):
            print(f"  {key:<20} {info['tags'][key]}")
    for key in ("gate_decision", "gate_reason"):
        if key in info["tags"]:
            print(f"  {key:<20} {info['tags'][key]}")
    print("reproduce:")
    for command in info["reproduce"]:
        print(f"  {command}")


def cmd_retrain(cfg: Config, args) -> None:
    from flows.retrain import retrain

    retrain(
        params=str(args.params),
        overrides=args.overrides,
        source=args.source,
        promote=False if args.no_promote else None,
        force=args.force,
    )


def cmd_monitor(cfg: Config, args) -> None:
    from flows.monitor import monitor
    from vae_pipeline.monitor import check_source, monitor_source

    check_source(monitor_source(cfg, args.source))  # a wrong path: one line, before the flow

    monitor(
        params=str(args.params),
        overrides=args.overrides,
        source=args.source,
        always=True if args.always else None,
        retrain_deployment=args.retrain_deployment,
    )


def _deploy_workdir(args) -> tuple[str | None, str | None]:
    """(workdir, absolute params path) for deployments that run in --workdir; (None, None)."""
    if args.workdir is None:
        return None, None
    return str(Path(args.workdir).resolve()), str(Path(args.params).resolve())


def cmd_deploy(cfg: Config, args) -> None:
    from flows import deploy

    root = Path(".").resolve()
    if args.check:
        path = root / deploy.PREFECT_FILE
        expected = deploy.render(cfg, args.overrides, *_deploy_workdir(args))
        if not path.is_file() or path.read_text() != expected:
            raise DeployMismatch(
                f"{path.name} does not match {args.params}: run `vae-pipeline deploy` (or "
                "render it and commit the change)"
            )
        print(f"{path.name} matches {args.params}")
        return
    for name in deploy.deploy(cfg, root, args.overrides, *_deploy_workdir(args)):
        print(f"deployed {name}")
    o = cfg.orchestration
    print(
        f"schedules: retrain {o.retrain_cron or 'none'}, monitor {cfg.monitor.cron or 'none'} ({o.timezone})"
    )
    print(f"start a worker: prefect worker start --pool {o.work_pool}")


class DeployMismatch(RuntimeError):
    """prefect.yaml is stale."""


def _load(cfg: Config, ref: str | None):
    from vae_pipeline import pipeline

    return pipeline.load_model_ref(cfg, ref or CHAMPION_URI.format(name=cfg.registry.model_name))


def _device(cfg: Config):
    import torch

    use_cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    return torch.device("cuda" if use_cuda else "cpu")


def cmd_sample(cfg: Config, args) -> None:
    from torchvision.utils import save_image

    from vae_pipeline.evaluate import prior_samples

    if args.n < 1 or args.temperature <= 0:
        raise ValueError("--n must be >= 1 and --temperature > 0")
    model, _ = _load(cfg, args.model)
    images = prior_samples(model, args.n, args.seed, _device(cfg), args.temperature)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, args.out, nrow=max(1, int(args.n**0.5)), padding=2, pad_value=0.5)
    print(args.out)


def cmd_interpolate(cfg: Config, args) -> None:
    from torchvision.utils import save_image

    from vae_pipeline import inference

    _, a = inference.image_ref(cfg, args.first)
    _, b = inference.image_ref(cfg, args.second)
    model, _ = _load(cfg, args.model)
    strip = inference.interpolate(model, a, b, args.steps, _device(cfg))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_image(strip, args.out, nrow=len(strip), padding=2, pad_value=0.5)
    print(args.out)


def _image_set(cfg: Config, args):
    from vae_pipeline import inference

    if args.split:
        return inference.split_images(cfg, args.split)
    return inference.folder_images(cfg, args.images)


def _table_metadata(cfg: Config, args, data, **extra) -> dict:
    source = f"split {args.split}" if args.split else str(args.images)
    return {
        "model": args.model or CHAMPION_URI.format(name=cfg.registry.model_name),
        "images": source,
        "data_version": data.data_version,
        **extra,
    }


def cmd_encode(cfg: Config, args) -> None:
    from vae_pipeline import inference, uses

    inference.check_table_path(args.out)
    model, _ = _load(cfg, args.model)
    data = _image_set(cfg, args)
    columns = inference.encode_columns(model, data, _device(cfg))
    meta = _table_metadata(cfg, args, data, latent_dim=model.latent_dim)
    print(inference.write_table(args.out, columns, meta))
    if args.plot:
        import numpy as np

        mu = np.column_stack([columns[f"mu_{j}"] for j in range(model.latent_dim)])
        print(uses.plot_latent_pca(mu, data.labels, data.label_names, args.plot))


def cmd_score(cfg: Config, args) -> None:
    from vae_pipeline import inference

    inference.check_table_path(args.out)
    model, meta = _load(cfg, args.model)
    threshold = meta.get("anomaly")
    if args.threshold is not None:
        threshold = {"score": cfg.anomaly.score, "threshold": args.threshold}
    elif threshold is None:
        log.info(
            "no anomaly threshold stored with %s: no is_anomaly column (registered models carry "
            "one; or pass --threshold NATS)",
            args.model or CHAMPION_URI.format(name=cfg.registry.model_name),
        )
    data = _image_set(cfg, args)
    columns = inference.score_columns(model, data, cfg.evaluate, _device(cfg), threshold)
    meta_out = _table_metadata(
        cfg,
        args,
        data,
        iw_k=int((threshold or {}).get("k") or cfg.evaluate.iw_samples),
        eval_seed=cfg.evaluate.seed,
        threshold=threshold,
    )
    print(inference.write_table(args.out, columns, meta_out))


COMMANDS = {
    "ingest": cmd_ingest,
    "prepare": cmd_prepare,
    "train": cmd_train,
    "evaluate": cmd_evaluate,
    "register": cmd_register,
    "promote": cmd_promote,
    "rollback": cmd_rollback,
    "history": cmd_history,
    "lineage": cmd_lineage,
    "retrain": cmd_retrain,
    "monitor": cmd_monitor,
    "deploy": cmd_deploy,
    "sample": cmd_sample,
    "interpolate": cmd_interpolate,
    "encode": cmd_encode,
    "score": cmd_score,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    apply_quiet_offline_defaults()
    try:
        cfg = load_config(args.params, [*args.overrides, *topology_overrides(args)])
    except ConfigError as exc:
        print(f"vae-pipeline {args.command}: {exc}", file=sys.stderr)
        return 2
    try:
        COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt as exc:  # Ctrl-C or SIGTERM: the cleanup has run on the way out
        print(f"vae-pipeline {args.command}: stopped ({exc or 'interrupted'})", file=sys.stderr)
        return 130
    except Exception as exc:
        if not _is_user_facing(exc):
            raise
        print(f"vae-pipeline {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


def _is_user_facing(exc: Exception) -> bool:
    """Errors whose message already says what is wrong: print it, no traceback."""
    known: tuple[type, ...] = (FileNotFoundError, ValueError, RuntimeError)
    if "mlflow" in sys.modules:
        from mlflow.exceptions import MlflowException

        known += (MlflowException,)
    return isinstance(exc, known)


def entry() -> int:
    """The `vae-pipeline` command: `main` with SIGTERM handled like Ctrl-C, so a scheduler's
    or `kill`'s stop leaves no torchrun, rank or Prefect server behind (set here, not in
    `main`, which tests and other programs call in their own process)."""
    exit_on_sigterm()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
