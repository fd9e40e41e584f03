"""The model's uses from the command line: sample, interpolate, encode, score."""

from __future__ import annotations

import logging

from vae_pipeline.cli.parser import CHAMPION_URI
from vae_pipeline.config import Config
from vae_pipeline.errors import UserError

log = logging.getLogger(__name__)


def _load(cfg: Config, ref: str | None):
    from vae_pipeline import pipeline

    return pipeline.load_model_ref(cfg, ref or CHAMPION_URI.format(name=cfg.registry.model_name))


def _device(cfg: Config):
    from vae_pipeline.train.distributed import pick_device

    return pick_device(cfg.train.device)


def cmd_sample(cfg: Config, args) -> None:
    from torchvision.utils import save_image

    from vae_pipeline.evaluate.estimator import prior_samples

    if args.n < 1 or args.temperature <= 0:
        raise UserError("--n must be >= 1 and --temperature > 0")
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
    from vae_pipeline import inference
    from vae_pipeline.evaluate import downstream, pictures

    inference.check_table_path(args.out)
    model, _ = _load(cfg, args.model)
    data = _image_set(cfg, args)
    columns = inference.encode_columns(model, data, _device(cfg))
    meta = _table_metadata(cfg, args, data, latent_dim=model.latent_dim)
    print(inference.write_table(args.out, columns, meta))
    if args.plot:
        import numpy as np

        mu = np.column_stack([columns[f"mu_{j}"] for j in range(model.latent_dim)])
        xy = downstream.project(mu, downstream.pca_basis(mu, 2))
        print(pictures.plot_latent_pca(xy, data.labels, data.label_names, args.plot))


def cmd_score(cfg: Config, args) -> None:
    from vae_pipeline import inference

    inference.check_table_path(args.out)
    model, meta = _load(cfg, args.model)
    threshold = meta.get("anomaly")
    if args.threshold is not None:
        stored = threshold or {}
        threshold = {"score": cfg.anomaly.score, "threshold": args.threshold}
        if cfg.anomaly.score == "typicality":  # tail probabilities of the stored reference
            if stored.get("score") != "typicality":
                raise UserError(
                    "--threshold with anomaly.score=typicality needs the validation reference "
                    f"stored with a typicality model; this model stores {stored.get('score')!r}: "
                    "set anomaly.score to another score"
                )
            threshold["reference"] = stored["reference"]
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
