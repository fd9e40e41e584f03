"""Data drift against the champion: score the new images of a snapshot and compare them with
the champion's own test set, by two checks.

New images are those whose content is not in the prepared data (data/prepared/index.csv):
the monitored source may keep old images beside new arrivals. They are decoded and fitted by
the one rule every source follows (`vae_pipeline.data.images.fit_array`), so a 28x28 image in
a folder is the same tensor as in Fashion-MNIST's IDX files.

- **likelihood** (two-sided, a typicality test in the sense of Nalisnick et al. 2019): the
  mean negative ELBO of the new images (nats per image, one posterior sample from each image's
  seeded stream, as in evaluation) against the champion's per-example values on its test set,
  stored with its MLflow run. It fires when the whole confidence interval of the shift lies
  beyond +-monitor.threshold_nats. Both ways: images from a simpler domain (digits for a
  clothing model) score *better* than the test set, and are drift too.
- **latent**: the encoder means of the new images against those of prepared test images
  (a sample of data.prepared_dir's test split), by the unbiased MMD^2 with a Gaussian kernel
  (median-distance bandwidth) and a permutation test (Gretton et al. 2012). It sees a change
  in what the images are, whether or not their likelihood moves.

Decision: drift when any check fires; each of the k checks runs at level
(1 - monitor.confidence) / k, so the false-alarm rate of the whole decision on in-distribution
images is at most 1 - monitor.confidence (Bonferroni).
"""

from __future__ import annotations

import csv
import logging
import math
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch

from vae_pipeline.config import Config, MonitorConfig
from vae_pipeline.data import snapshot_source
from vae_pipeline.data.errors import DataError, NoImages
from vae_pipeline.data.images import BadImage, decode_image, list_images
from vae_pipeline.data.preparation import content_hash
from vae_pipeline.data.sources import source_kind
from vae_pipeline.evaluate import per_example_terms
from vae_pipeline.registry import PER_EXAMPLE, champion
from vae_pipeline.tracking import client_for, download_weights
from vae_pipeline.train import load_model

log = logging.getLogger(__name__)


class MonitorError(RuntimeError):
    """The monitor cannot score: no champion, no reference, or no usable source."""


@dataclass
class Check:
    """One drift check: its statistic, what it is compared with, and what that means."""

    name: str
    statistic: float
    bound: float
    fired: bool
    line: str


@dataclass
class DriftDecision:
    retrain: bool
    drift: bool
    reason: str
    shift: float  # mean new score minus mean reference score, nats per image
    stderr: float
    lower_bound: float
    upper_bound: float
    threshold: float
    confidence: float
    new_mean: float
    new_n: int
    reference_mean: float
    reference_n: int
    mmd2: float = math.nan
    mmd_p: float = math.nan
    checks: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def welch_t(alpha: float, a: float, b: float, n: int, m: int) -> float:
    """The two-sided (1 - alpha) quantile of Student's t with Welch-Satterthwaite degrees of
    freedom, for squared standard errors a (n values) and b (m values): a few new images get
    the wider interval they need (a normal quantile under-covers at n = 10)."""
    from scipy.stats import t

    if a + b == 0:
        return 0.0
    df = (a + b) ** 2 / (a**2 / (n - 1) + b**2 / (m - 1))
    return float(t.ppf(1 - alpha / 2, df))


def likelihood_check(
    new: np.ndarray, reference: np.ndarray, threshold: float, alpha: float
) -> tuple[Check, dict]:
    """Two-sided test of the mean per-image score: the (1 - alpha) Welch interval of the shift
    (a difference of two independent means) must lie wholly beyond +-threshold to fire."""
    new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
    shift = float(new.mean() - reference.mean())
    a, b = new.var(ddof=1) / len(new), reference.var(ddof=1) / len(reference)
    stderr = math.sqrt(a + b)
    half = welch_t(alpha, a, b, len(new), len(reference)) * stderr
    lower, upper = shift - half, shift + half
    fired = lower > threshold or upper < -threshold
    if lower > threshold:
        meaning = "the new images are less likely under the champion than its test set"
    elif upper < -threshold:
        meaning = (
            "the new images are MORE likely than its test set: simpler images, typically "
            "another domain (a likelihood model rates those highly)"
        )
    else:
        meaning = "no shift beyond the threshold"
    line = (
        f"likelihood: mean negative ELBO {new.mean():.2f} vs {reference.mean():.2f} nats, "
        f"shift {shift:+.2f}, {1 - alpha:.1%} interval [{lower:+.2f}, {upper:+.2f}] vs "
        f"+-{threshold:g}: {meaning}"
    )
    numbers = {"shift": shift, "stderr": stderr, "lower_bound": lower, "upper_bound": upper}
    return Check("likelihood", shift, threshold, fired, line), numbers


def _mmd2_rows(kernel: np.ndarray, in_x: np.ndarray) -> np.ndarray:
    """Unbiased MMD^2 for each column of the boolean assignment `in_x` (N, P) over a kernel
    matrix with a zero diagonal."""
    a = in_x.astype(np.float64)
    b = 1.0 - a
    n, m = a.sum(0), b.sum(0)
    ka, kb = kernel @ a, kernel @ b
    xx = (a * ka).sum(0) / (n * (n - 1))
    yy = (b * kb).sum(0) / (m * (m - 1))
    xy = (a * kb).sum(0) / (n * m)
    return xx + yy - 2.0 * xy


def mmd_test(
    x: np.ndarray, y: np.ndarray, permutations: int, seed: int
) -> tuple[float, float, float]:
    """(unbiased MMD^2, permutation p-value, kernel bandwidth^2) of samples x (n, d) and y
    (m, d), with k(a, b) = exp(-|a - b|^2 / h) and h the median squared distance of the pooled
    sample (a function of the pool alone, so the permutation test stays exact)."""
    z = np.vstack([np.asarray(x, np.float64), np.asarray(y, np.float64)])
    n = len(x)
    sq = (z * z).sum(1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0)
    off = d2[np.triu_indices(len(z), 1)]
    h = float(np.median(off)) if off.size and np.median(off) > 0 else 1.0
    kernel = np.exp(-d2 / h)
    np.fill_diagonal(kernel, 0.0)
    labels = np.zeros(len(z), bool)
    labels[:n] = True
    rng = np.random.default_rng(seed)
    stats = []
    for start in range(0, permutations, 100):  # (N, 100) assignments at a time
        cols = min(100, permutations - start)
        stats.append(
            _mmd2_rows(kernel, np.stack([rng.permutation(labels) for _ in range(cols)], 1))
        )
    observed = float(_mmd2_rows(kernel, labels[:, None])[0])
    null = np.concatenate(stats)
    p = float((1 + np.sum(null >= observed)) / (1 + len(null)))
    return observed, p, h


def latent_check(
    new_mu: np.ndarray, ref_mu: np.ndarray, alpha: float, permutations: int, seed: int
) -> tuple[Check, dict]:
    """MMD permutation test on encoder means: fires when its p-value is at most alpha."""
    mmd2, p, _ = mmd_test(new_mu, ref_mu, permutations, seed)
    fired = p <= alpha
    meaning = (
        "the new images' latent codes are distributed differently from the test images'"
        if fired
        else "no difference found"
    )
    line = (
        f"latent: MMD^2 {mmd2:.4f} between the encoder means of {len(new_mu)} new and "
        f"{len(ref_mu)} test images, permutation p = {p:.3f} vs {alpha:.3f}: {meaning}"
    )
    return Check("latent", p, alpha, fired, line), {"mmd2": mmd2, "mmd_p": p}


def drift_decision(
    new: np.ndarray,
    reference: np.ndarray,
    mcfg: MonitorConfig,
    always: bool = False,
    new_mu: np.ndarray | None = None,
    ref_mu: np.ndarray | None = None,
    latent_note: str | None = None,
) -> DriftDecision:
    """Combine the checks on per-image scores (negative ELBO) and, when given, encoder means:
    drift when any fires, each at level (1 - confidence) / k."""
    new, reference = np.asarray(new, np.float64), np.asarray(reference, np.float64)
    if len(new) < 2 or len(reference) < 2:
        raise MonitorError(
            f"need at least 2 scores on each side (new {len(new)}, reference {len(reference)})"
        )
    latent = new_mu is not None and ref_mu is not None and len(new_mu) >= 2 and len(ref_mu) >= 2
    alpha = (1.0 - mcfg.confidence) / (2 if latent else 1)
    check, numbers = likelihood_check(new, reference, mcfg.threshold_nats, alpha)
    checks = [check]
    if latent:
        check, mmd = latent_check(new_mu, ref_mu, alpha, mcfg.permutations, mcfg.seed)
        checks.append(check)
        numbers.update(mmd)
    drift = any(c.fired for c in checks)
    fired = [c.name for c in checks if c.fired]
    reason = (
        f"drift ({', '.join(fired)} check{'s' if len(fired) > 1 else ''} fired)"
        if drift
        else f"no drift ({' and '.join(c.name for c in checks)} checks quiet)"
    )
    if not latent:
        reason += f"; latent check not run: {latent_note or 'no encoder means given'}"
    if always and not drift:
        reason += "; retraining anyway (always_retrain)"
    return DriftDecision(
        retrain=drift or always,
        drift=drift,
        reason=reason,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=float(new.mean()),
        new_n=len(new),
        reference_mean=float(reference.mean()),
        reference_n=len(reference),
        checks=[asdict(c) for c in checks],
        **numbers,
    )


def monitor_source(cfg: Config, source: str | None = None) -> str:
    return source or cfg.monitor.source or cfg.data.source


FIXED_SOURCE = (
    "{source} is a fixed dataset: no new images to score (point monitor.source or --source at "
    "the folder, archive or s3:// prefix where new images arrive)"
)


def check_source(source: str, workdir: Path = Path(".")) -> None:
    """Refuse a local monitor.source that does not exist, naming the setting (before a flow
    starts, so the error is one line)."""
    kind = source_kind(source)
    if kind in ("folder", "archive") and not (workdir / source).exists():
        raise MonitorError(
            f"monitor.source {source!r} does not exist: point monitor.source (or --source) at "
            "the folder, archive or s3:// prefix where new images land"
        )


def snapshot(cfg: Config, source: str, workdir: Path = Path(".")) -> tuple[Path | None, str]:
    """Incrementally copy `source` into monitor.snapshot_dir, checking every new image as
    ingest does (bad ones are left out per data.on_bad_image): (the folder, "") or (None, why
    there is nothing to score: a fixed dataset, or a source without one usable image)."""
    if source_kind(source) in ("fashion-mnist", "idx"):
        return None, FIXED_SOURCE.format(source=source)
    check_source(source, workdir)
    folder = Path(cfg.monitor.snapshot_dir) / "images"
    mcfg = cfg.model_copy(
        update={"data": cfg.data.model_copy(update={"source": source, "raw_dir": str(folder)})}
    )
    try:
        snapshot_source(mcfg, workdir)
    except NoImages as exc:
        return None, f"monitor.source: {exc}: nothing to measure"
    except DataError as exc:
        raise MonitorError(f"monitor.source: {exc}") from exc
    return workdir / folder, ""


def known_hashes(cfg: Config, workdir: Path = Path(".")) -> set[str]:
    """Content hashes (sha256) of the images in the prepared data (its index.csv)."""
    index = workdir / cfg.data.prepared_dir / "index.csv"
    if not index.is_file():
        return set()
    with open(index, newline="") as fh:
        return {row["sha256"] for row in csv.DictReader(fh)}


def new_images(folder: Path, known: set[str]) -> list[Path]:
    """The images of `folder` whose content is not among `known`."""
    return [p for p in list_images(folder) if content_hash(p.read_bytes()) not in known]


def load_images(
    cfg: Config, folder: Path, paths: list[Path], max_images: int, seed: int
) -> tuple[list[str], torch.Tensor]:
    """Up to `max_images` of `paths` (a seeded sample when there are more), decoded and fitted
    as prepare does: (names relative to `folder`, uint8 tensor N x C x H x W)."""
    if len(paths) > max_images:
        keep = np.random.default_rng(seed).choice(len(paths), max_images, replace=False)
        paths = [paths[i] for i in sorted(keep)]
    names, arrays = [], []
    for path in paths:
        try:
            arrays.append(
                decode_image(
                    path, cfg.data.image_size, cfg.data.channels, cfg.data.max_image_pixels
                )
            )
            names.append(str(path.relative_to(folder)))
        except BadImage as exc:
            log.warning("not scoring %s", exc)
    shape = (0, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    return names, torch.from_numpy(np.stack(arrays)) if arrays else torch.zeros(
        shape, dtype=torch.uint8
    )


def champion_reference(cfg: Config, uri: str):
    """(champion model version, its per-example negative ELBO on its own test set)."""
    name = cfg.registry.model_name
    mv = champion(client_for(uri), name)
    if mv is None:
        raise MonitorError(f"{name} has no champion to compare with: run the retrain flow first")
    try:
        local = mlflow.artifacts.download_artifacts(
            run_id=mv.run_id,
            artifact_path=PER_EXAMPLE.format(metric="elbo_nll"),
            dst_path=tempfile.mkdtemp(prefix="vae-monitor-"),
            tracking_uri=uri,
        )
    except Exception as exc:
        raise MonitorError(
            f"{name} v{mv.version}: its run {mv.run_id} holds no per-example ELBO "
            f"({exc}); re-register it with `vae-pipeline register`"
        ) from exc
    return mv, np.load(local)


def score(
    cfg: Config, model, images: torch.Tensor, binarize: str, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(per-image negative ELBO in nats, encoder means), evaluated like the reference: same
    binarize policy, one posterior sample from each image's seeded stream."""
    ecfg = cfg.evaluate.model_copy(
        update={"iw_samples": 1, "iw_chunk": 1, "binarize": binarize, "seed": seed}
    )
    device = torch.device(
        "cuda" if torch.cuda.is_available() and cfg.train.device != "cpu" else "cpu"
    )
    terms = per_example_terms(model, images, ecfg, device)
    return -terms["elbo"], np.asarray(terms["mu"], np.float64)


def reference_images(cfg: Config, model, workdir: Path, n: int, seed: int):
    """A seeded sample of up to `n` prepared test images for the latent check: (uint8 tensor,
    "") or (None, why the check cannot run)."""
    path = workdir / cfg.data.prepared_dir / "test_images.npy"
    if not path.is_file():
        return None, (
            f"no prepared test split ({path.name} in {cfg.data.prepared_dir}) to compare "
            "latent codes with: run `dvc pull` or `vae-pipeline prepare` here"
        )
    test = np.load(path, mmap_mode="r")
    expected = (model.in_channels, model.image_size, model.image_size)
    if tuple(test.shape[1:]) != expected or len(test) < 2:
        return None, (
            f"the prepared test images are {len(test)} x {tuple(test.shape[1:])}, the champion "
            f"takes {expected}: re-prepare with the champion's data settings"
        )
    rows = np.sort(np.random.default_rng(seed).choice(len(test), min(n, len(test)), replace=False))
    return torch.from_numpy(np.ascontiguousarray(test[rows])), ""


def check_drift(
    cfg: Config,
    uri: str,
    workdir: Path = Path("."),
    source: str | None = None,
    always: bool | None = None,
) -> dict:
    """Snapshot the monitored source, score it with the champion, decide whether to retrain."""
    source = monitor_source(cfg, source)
    always = cfg.monitor.always_retrain if always is None else always
    mv, reference = champion_reference(cfg, uri)
    tags = mv.tags or {}
    folder, why = snapshot(cfg, source, workdir)
    fresh = [] if folder is None else new_images(folder, known_hashes(cfg, workdir))
    found = {
        "source": source,
        "snapshot_images": 0 if folder is None else len(list_images(folder)),
        "champion_version": str(mv.version),
        "champion_test_data_version": tags.get("test_data_version"),
    }
    names: list[str] = []
    if fresh:
        mcfg = cfg.monitor
        names, images = load_images(cfg, folder, fresh, mcfg.max_images, mcfg.seed)
    if folder is None:
        decision = no_new_data(0, reference, cfg.monitor, always, why)
    elif len(names) < 2:
        unreadable = f" ({len(fresh) - len(names)} unreadable)" if len(fresh) > len(names) else ""
        why = (
            f"{len(names)} usable new image(s){unreadable} since the prepared data: the checks "
            "need 2 or more: nothing to measure"
        )
        decision = no_new_data(len(names), reference, cfg.monitor, always, why)
    else:
        model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
        binarize = tags.get("binarize", "none")
        scores, new_mu = score(cfg, model, images, binarize, cfg.monitor.seed)
        ref_mu, note = None, "monitor.latent_check is off"
        if cfg.monitor.latent_check:
            ref_images, note = reference_images(
                cfg, model, workdir, cfg.monitor.max_images, cfg.monitor.seed
            )
            if ref_images is not None:
                _, ref_mu = score(cfg, model, ref_images, binarize, cfg.monitor.seed + 1)
        decision = drift_decision(
            scores, reference, cfg.monitor, always, new_mu, ref_mu, latent_note=note
        )
    log.info(
        "monitor: %d new of %d images in %s, scored with %s v%s: %s",
        len(fresh),
        found["snapshot_images"],
        source,
        mv.name,
        mv.version,
        decision.reason,
    )
    for check in decision.checks:
        log.info("monitor: %s", check["line"])
    return {**found, "new_images": len(fresh), **decision.as_dict()}


def no_new_data(
    n_new: int, reference: np.ndarray, mcfg: MonitorConfig, always: bool, why: str
) -> DriftDecision:
    """The decision when fewer than 2 images can be scored: nothing to measure."""
    reason = why
    if always:
        reason += "; retraining anyway (always_retrain)"
    nan = math.nan
    return DriftDecision(
        retrain=always,
        drift=False,
        reason=reason,
        shift=nan,
        stderr=nan,
        lower_bound=nan,
        upper_bound=nan,
        threshold=mcfg.threshold_nats,
        confidence=mcfg.confidence,
        new_mean=nan,
        new_n=n_new,
        reference_mean=float(np.mean(reference)),
        reference_n=len(reference),
    )
