"""Shared fixtures: tiny configs and throwaway git+DVC workspaces, all on CPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from vae_pipeline.config import build_config, save_config
from vae_pipeline.config.environment import apply_quiet_offline_defaults

REPO = Path(__file__).resolve().parents[1]
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Small enough for seconds on 2 cores, real enough to train: the real Fashion-MNIST images.
TINY = {
    "data": {"limit": 256},
    "model": {"latent_dim": 8},
    # channels_last and precision fixed: parity tests compare runs of other batch sizes, and
    # plain fp32 reference loops, which the step probe could time into other layouts (float
    # rounding) or into bf16 on a CPU with bf16 units; auto has tests of its own
    "train": {
        "epochs": 1,
        "batch_size": 64,
        "nproc_per_node": 2,
        "log_every": 1000,
        "channels_last": True,
        "precision": "fp32",
    },
    "evaluate": {"iw_samples": 4, "iw_chunk": 4, "batch_size": 128, "n_samples": 16},
    "probe": {"labels_per_class": [10], "draws": 2},
    "generation": {"fd_images": 200, "fd_components": 8},
    # No floors by default: a tiny model's probe accuracy is noisy; floor tests set their own.
    "promotion": {"floors": {}},
}


def tiny_params(**sections) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in {**TINY}.items():
        params[section].update(values)
    for section, values in sections.items():
        params[section].update(values)
    return params


@pytest.fixture(scope="session", autouse=True)
def _quiet_env(tmp_path_factory):
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    # Prefect's ephemeral server logs its shutdown at interpreter exit, after pytest has closed
    # the captured streams; keep its logger quiet in tests.
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    # step-probe results (train.autotune_cache) go to a temporary cache, not the user's
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    apply_quiet_offline_defaults()


def make_workspace(root: Path, **sections) -> Path:
    """A fresh git repo with params.yaml (tiny values), like a user's clone of the project."""
    root.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.email", "ci@example.com"], cwd=root, check=True)
    subprocess.run(["git", "config", "user.name", "ci"], cwd=root, check=True)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(**sections), sort_keys=False))
    return root


@pytest.fixture
def workspace(tmp_path) -> Path:
    return make_workspace(tmp_path / "ws")


@pytest.fixture
def tiny_cfg():
    return build_config(tiny_params())


def copy_project_files(dest: Path, *names: str) -> None:
    for name in names:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)


def fashion_mnist_pngs(root: Path, start: int, n: int, invert: bool = False) -> Path:
    """Fashion-MNIST test images start..start+n as PNG files in one folder per class (the
    layout a team's image folder has); `invert` makes a shifted copy (255 - pixel)."""
    import gzip

    import numpy as np
    from PIL import Image

    with gzip.open(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    for i in range(start, start + n):
        folder = root / f"class{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        pixels = 255 - images[i] if invert else images[i]
        Image.fromarray(pixels).save(folder / f"{'inv' if invert else 'img'}{i:05d}.png")
    return root


@pytest.fixture(scope="session")
def bagless(tmp_path_factory):
    """A short real training on 2,000 Fashion-MNIST images without the class Bag (the anomaly
    benchmark's held-out class), evaluated: (workspace, config, model, metrics). Shared by the
    uses' tests (uses, inference, the CLI) so the suite trains it once (about 30 s)."""
    from vae_pipeline import pipeline
    from vae_pipeline.data.sources import snapshot_source
    from vae_pipeline.train.checkpoint import load_model
    from vae_pipeline.train.trainer import Trainer

    ws = make_workspace(tmp_path_factory.mktemp("bagless") / "ws")
    cfg = build_config(
        tiny_params(
            data={"limit": 2000},
            train={"epochs": 3, "nproc_per_node": 1},
            anomaly={"holdout_class": "Bag"},
            probe={"labels_per_class": [10, 50], "draws": 3},
            generation={"fd_images": 500, "fd_components": 16},
        )
    )
    snapshot_source(cfg, ws)
    pipeline.prepare_data(cfg, ws)
    Trainer(cfg, ws / "models", workdir=ws).fit()
    model, _ = load_model(ws / "models" / "model.pt")
    metrics = pipeline.evaluate_model(cfg, "models", ws)
    save_config(cfg, ws / "bagless.yaml")  # the CLI's --params for this model
    return ws, cfg, model, metrics


@pytest.fixture(scope="session")
def registered(bagless) -> str:
    """`bagless` registered the way the retrain does it (anomaly.json with the threshold), in
    the SQLite store of its workspace; returns its models:/ URI."""
    from vae_pipeline import pipeline, tracking
    from vae_pipeline.config.environment import tracking_uri

    ws, cfg, _, metrics = bagless
    uri = tracking_uri(cfg, ws)
    run_id = tracking.start_run(cfg, uri, ws, "uses-test", {})
    version = pipeline.register(cfg, run_id, ws / "models" / "model.pt", metrics, ws)
    tracking.finish_run(uri, run_id)
    return f"models:/{cfg.registry.model_name}/{version}"


@pytest.fixture(scope="session")
def images() -> list[str]:
    """The stack's images for the container tests (tests/container_helpers.py), built once."""
    from .container_helpers import build_images

    return build_images()
