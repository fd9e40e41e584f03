"""Anomaly scores against the inputs that fool likelihood models: AUROC and flag rate per score.

For a trained model (a train out dir or model.pt, e.g. `models/` after `make run`) and its
prepared data: every score of `anomaly.score` is calibrated as the pipeline does (the 99th
percentile of a seeded sample of validation images), then applied to the Fashion-MNIST test
images (the normal images) and to sets of out-of-domain images, each fitted to the model's
frame by the ingest rule (smaller images are centred on black, never scaled):

  uniform noise at 8x8, 20x20 and 28x28; constant images (black, white, mid-grey, and all 256
  levels); drawn digits (0-9 in DejaVu Sans, random size, place and stroke, white on black,
  MNIST's look); the test images inverted (255 - x) and upside down; and, with --holdout-model,
  the held-out class of a model trained without it.

For each set and score: AUROC against the normal images, and the share flagged at the
calibrated threshold (the normal images' own flag rate is the false alarm rate, 1% by design).
Prints a Markdown table (docs/evaluation.md has a run) and, with --json, writes the numbers.

    python bench/anomaly_ood.py --model models --prepared data/prepared
    python bench/anomaly_ood.py --model models --prepared data/prepared \\
        --holdout-model ../heldout/models --holdout-prepared ../heldout/data/prepared
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

from vae_pipeline.config.sections import EvaluateConfig
from vae_pipeline.data.dataset import PreparedSplit
from vae_pipeline.data.images import fit_array
from vae_pipeline.evaluate.anomaly import SCORES, anomaly_scores, calibrate
from vae_pipeline.evaluate.downstream import auroc_auprc, seeded_subset
from vae_pipeline.evaluate.estimator import per_example_terms
from vae_pipeline.evaluate.model_file import load_weights, local_weights

FONT = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"


def noise(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 1, side, side), dtype=np.uint8)


def constant(levels: list[int], side: int) -> np.ndarray:
    return np.stack([np.full((1, side, side), v, np.uint8) for v in levels])


def digits(n: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """Digits drawn white on black, MNIST-like: random digit, size, offset and stroke."""
    from PIL import Image, ImageDraw, ImageFilter, ImageFont

    out = np.empty((n, 1, side, side), np.uint8)
    for i in range(n):
        size = int(rng.integers(side * 5 // 8, side * 7 // 8))
        try:
            font = ImageFont.truetype(FONT, size)
        except OSError:
            font = ImageFont.load_default(size)
        img = Image.new("L", (side, side), 0)
        draw = ImageDraw.Draw(img)
        text = str(int(rng.integers(10)))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        x = (side - (right - left)) / 2 - left + rng.normal(0, 1.5)
        y = (side - (bottom - top)) / 2 - top + rng.normal(0, 1.5)
        draw.text((x, y), text, fill=255, font=font, stroke_width=int(rng.integers(0, 2)))
        img = img.rotate(float(rng.normal(0, 8)), resample=Image.BILINEAR)
        out[i, 0] = np.asarray(img.filter(ImageFilter.GaussianBlur(0.5)))
    return out


def content(images: torch.Tensor, box: list[int] | None) -> np.ndarray:
    """The source-sized images inside the frame (Fashion-MNIST's 28x28 inside 32x32)."""
    a = images.numpy()
    if box is None:
        return a
    top, left, h, w = box
    return a[:, :, top : top + h, left : left + w]


def fitted(arrays: np.ndarray, image_size: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([fit_array(a, image_size) for a in arrays]))


def ood_sets(test: torch.Tensor, box, image_size: int, n: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = content(test, box)
    side = src.shape[-1]
    sub = src[rng.choice(len(src), size=min(n, len(src)), replace=False)]
    raw = {
        "noise 8x8": noise(n, 8, rng),
        "noise 20x20": noise(n, 20, rng),
        f"noise {side}x{side}": noise(n, side, rng),
        "black": constant([0], side),
        "white": constant([255], side),
        "mid-grey": constant([128], side),
        "constant, 256 levels": constant(list(range(256)), side),
        "drawn digits": digits(n, side, rng),
        "inverted clothing": 255 - sub,
        "upside-down clothing": sub[..., ::-1, :].copy(),
    }
    return {name: fitted(a, image_size) for name, a in raw.items()}


def score_model(
    weights_ref: str, prepared: Path, n: int, k: int, seed: int, cal_images: int, percentile: float
) -> tuple[dict, dict]:
    model, meta = load_weights(local_weights(weights_ref))
    device = torch.device("cpu")
    ecfg = EvaluateConfig(iw_samples=k, iw_chunk=min(k, 16), seed=0)
    manifest = json.loads((prepared / "manifest.json").read_text())
    names = list(manifest.get("label_names") or [])
    held_name = meta.get("holdout_class")
    holdout = None if held_name is None else names.index(held_name)
    val = PreparedSplit(prepared, "val", holdout)
    pos = seeded_subset(len(val), cal_images, ecfg.seed)
    t0 = time.perf_counter()
    cal = per_example_terms(model, val.take(pos), ecfg, device, torch.from_numpy(pos))
    test_all = PreparedSplit(prepared, "test")
    labels = np.asarray(test_all.labels)
    images = test_all.tensor()
    terms = {"normal": per_example_terms(model, images, ecfg, device)}
    normal_mask = np.ones(len(labels), bool) if holdout is None else labels != holdout
    sets = ood_sets(images[normal_mask], model.content_box, model.image_size, n, seed)
    for name, x in sets.items():
        terms[name] = per_example_terms(model, x, ecfg, device)
    print(f"scored {sum(len(t['elbo']) for t in terms.values())} images in "
          f"{time.perf_counter() - t0:.0f} s (K={k})", flush=True)  # fmt: skip
    table: dict = {}
    for score in SCORES:
        threshold, reference = calibrate(cal, score, percentile)
        normal = anomaly_scores(terms["normal"], score, reference)
        held = {}
        if holdout is not None:
            held = {"held-out class": normal[~normal_mask]}
            normal = normal[normal_mask]
        rows = {"Fashion-MNIST test (normal)": (None, float((normal > threshold).mean()))}
        others = {name: anomaly_scores(t, score, reference) for name, t in terms.items()}
        others.pop("normal")
        others.update(held)
        for name, s in others.items():
            is_ood = np.r_[np.zeros(len(normal), bool), np.ones(len(s), bool)]
            auroc, _ = auroc_auprc(np.r_[normal, s], is_ood)
            rows[name] = (auroc, float((s > threshold).mean()))
        table[score] = {"threshold": threshold, "rows": rows}
    info = {"holdout": held_name, "model": weights_ref}
    return table, info


def markdown(tables: list[dict]) -> str:
    header = "| set | " + " | ".join(f"{s}: AUROC / flagged" for s in SCORES) + " |"
    lines = [header, "|---|" + "---|" * len(SCORES)]
    seen = []
    for t in tables:
        for name in t[SCORES[0]]["rows"]:
            if name not in seen:
                seen.append(name)
    for name in seen:
        cells = []
        for s in SCORES:
            cell = next((t[s]["rows"][name] for t in tables if name in t[s]["rows"]), None)
            auroc, flagged = cell
            cells.append(("" if auroc is None else f"{auroc:.3f} / ") + f"{flagged:.1%}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="models", help="train out dir or model.pt (default models)")
    p.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    p.add_argument("--holdout-model", help="a model trained with anomaly.holdout_class set")
    p.add_argument("--holdout-prepared", type=Path, help="its prepared data")
    p.add_argument("--n", type=int, default=200, help="images per out-of-domain set (200)")
    p.add_argument("--k", type=int, default=16, help="IW samples (evaluate.iw_samples: 16)")
    p.add_argument("--calibration-images", type=int, default=4000)
    p.add_argument("--percentile", type=float, default=99.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, help="write the numbers here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    common = (args.n, args.k, args.seed, args.calibration_images, args.percentile)
    tables, infos = [], []
    table, info = score_model(args.model, args.prepared, *common)
    tables.append(table)
    infos.append(info)
    if args.holdout_model:
        table, info = score_model(args.holdout_model, args.holdout_prepared, *common)
        for s in SCORES:  # only the held-out class row comes from the second model
            table[s]["rows"] = {"held-out class": table[s]["rows"]["held-out class"]}
        tables.append(table)
        infos.append(info)
    print(f"{date.today()}, {platform.node()}, K={args.k}, n={args.n}, p{args.percentile:g}")
    print(markdown(tables))
    if args.json:
        args.json.write_text(json.dumps({"tables": tables, "info": infos}, indent=2))


if __name__ == "__main__":
    main()
