"""Evaluation on a tiny real test split: per-dimension KL, I(x;z), binarization, determinism,
the pictures and the Markdown summary."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torch.distributions import Normal, kl_divergence

from vae_pipeline import pipeline
from vae_pipeline.config import build_config
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.evaluate import evaluate
from vae_pipeline.evaluate.estimator import per_example_terms
from vae_pipeline.model import ConvVAE
from vae_pipeline.train.checkpoint import save_model

from .conftest import make_workspace, tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    ws = make_workspace(tmp_path_factory.mktemp("eval") / "ws")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, ws)
    pipeline.prepare_data(cfg, ws)
    torch.manual_seed(0)
    model = ConvVAE(1, 32, cfg.model.latent_dim).eval()
    return ws, cfg, model, evaluate(cfg, model, ws)


def test_kl_per_dim_matches_torch_distributions_and_sums_to_kl(prepared):
    ws, cfg, model, metrics = prepared
    images = PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor()
    with torch.no_grad():
        mu, logvar = model.encode(to_unit_float(images))
    q = Normal(mu.double(), torch.exp(0.5 * logvar.double()))
    expected = kl_divergence(q, Normal(0.0, 1.0)).mean(dim=0).numpy()
    np.testing.assert_allclose(metrics["kl_per_dim"], expected, rtol=1e-5)
    assert len(metrics["kl_per_dim"]) == cfg.model.latent_dim
    # per-dim KL is computed in float64, the per-example KL in float32
    assert sum(metrics["kl_per_dim"]) == pytest.approx(metrics["kl"], rel=1e-5)


def test_mutual_information_is_within_its_bounds(prepared):
    _, cfg, _, metrics = prepared
    # 0 <= I(x;z) <= log N for the estimator on N examples; an encoder that reads its input
    # (random weights still do) carries some information.
    assert 0.0 < metrics["mutual_info"] <= math.log(metrics["n_examples"]) + 1e-9


def test_evaluation_is_deterministic(prepared):
    ws, cfg, model, metrics = prepared
    again = evaluate(cfg, model, ws)
    for key, value in metrics.items():
        if not key.endswith("_seconds"):
            assert again[key] == value, key


def test_fixed_binarization_equals_evaluating_thresholded_images(prepared):
    ws, cfg, model, _ = prepared
    images = PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor()[:64]
    fixed = cfg.evaluate.model_copy(update={"binarize": "fixed"})
    thresholded = (images >= 128).to(torch.uint8) * 255  # x / 255 > 0.5  <=>  x >= 128
    a = per_example_terms(model, images, fixed, torch.device("cpu"))
    b = per_example_terms(model, thresholded, cfg.evaluate, torch.device("cpu"))
    for key in ("recon", "kl", "iw_log_px"):
        np.testing.assert_array_equal(a[key], b[key])
    dynamic = cfg.evaluate.model_copy(update={"binarize": "dynamic"})
    c = per_example_terms(model, images, dynamic, torch.device("cpu"))
    assert not np.array_equal(c["recon"], a["recon"])  # a different policy, a different number


def test_pictures_and_summary(prepared):
    ws, cfg, _, metrics = prepared
    reports = ws / cfg.evaluate.reports_dir
    side = 64 + 2  # 32 px upscaled x2, plus padding
    # 4 pairs of test images, each row: input, 9 interpolation steps, input.
    assert Image.open(reports / "interpolation.png").size == (11 * side + 2, 4 * side + 2)
    # One row per latent unit (8 here), 9 values each.
    assert Image.open(reports / "traversal.png").size == (9 * side + 2, 8 * side + 2)
    assert Image.open(reports / "kl_per_dim.png").size[0] > 300
    summary = (reports / "summary.md").read_text()
    assert f"| IW NLL (K=4) | {metrics['iw_nll']:.4g} | {metrics['iw_nll_stderr']:.3g} |" in summary
    assert f"| active units | {metrics['active_units']} |" in summary
    stored = json.loads((reports / "metrics.json").read_text())
    assert stored["binarize"] == "none" and stored["mutual_info"] == metrics["mutual_info"]


def test_per_example_values_do_not_depend_on_batching_or_position(prepared):
    ws, cfg, model, _ = prepared
    images = PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor()[:40]
    for policy in ("none", "dynamic"):
        ecfg = cfg.evaluate.model_copy(update={"binarize": policy})
        whole = per_example_terms(model, images, ecfg, torch.device("cpu"))
        # Examples 10..29 alone, in batches of 7: each keeps its own noise (and Bernoulli draw).
        part = per_example_terms(
            model,
            images[10:30],
            ecfg.model_copy(update={"batch_size": 7}),
            torch.device("cpu"),
            torch.arange(10, 30),
        )
        for key in ("recon", "kl", "elbo", "iw_log_px"):
            # float rounding of other batch shapes only
            np.testing.assert_allclose(part[key], whole[key][10:30], rtol=1e-5, err_msg=key)
    # Shifting the indices is another draw: the index, not the position in the batch, keys it.
    shifted = per_example_terms(
        model, images[10:30], cfg.evaluate, torch.device("cpu"), torch.arange(11, 31)
    )
    assert not np.allclose(shifted["iw_log_px"], whole["iw_log_px"][10:30], rtol=1e-5)


def test_bits_per_dim_of_a_padded_model_divides_its_nats_by_the_content_box(prepared):
    """evaluate() of a model whose real pixels are the 28x28 box of the 32x32 images: D is
    784 (what its likelihood sums over), not the padded 1024."""
    ws, cfg, _, _ = prepared
    boxed_cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"reports_dir": "reports-boxed"})}
    )
    torch.manual_seed(1)
    model = ConvVAE(1, 32, cfg.model.latent_dim, content_box=[2, 2, 28, 28]).eval()
    metrics = evaluate(boxed_cfg, model, ws)
    stored = np.load(ws / "reports-boxed" / "per_example_iw_nll.npy")
    nats = sum(stored.tolist()) / len(stored)
    assert metrics["iw_nll"] == pytest.approx(nats, rel=1e-9)
    assert metrics["pixels"] == 28 * 28 == model.pixel_count()
    assert metrics["bits_per_dim"] == pytest.approx(nats / (28 * 28 * math.log(2)), rel=1e-9)
    assert metrics["bits_per_dim"] != pytest.approx(nats / (32 * 32 * math.log(2)), rel=0.1)


@pytest.mark.slow
def test_sharded_over_two_ranks_equals_one_process(prepared):
    ws, cfg, model, metrics = prepared
    single = np.load(ws / cfg.evaluate.reports_dir / "per_example_iw_nll.npy")
    save_model(model, ws / "eval-model.pt")
    reports = "reports-sharded"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "vae_pipeline.cli",
            "evaluate",
            "--model",
            "eval-model.pt",
            "--set",
            "evaluate.nproc_per_node=2",
            "--set",
            f"evaluate.reports_dir={reports}",
        ],
        cwd=ws,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launching 2 evaluation rank(s)" in result.stderr
    sharded = np.load(ws / reports / "per_example_iw_nll.npy")
    assert sharded.shape == single.shape == (metrics["n_examples"],)
    # Each rank runs one thread (torchrun's OMP_NUM_THREADS=1), this process two: the same
    # draws, summed in another order at most.
    np.testing.assert_allclose(sharded, single, rtol=1e-6)
    again = json.loads((ws / reports / "metrics.json").read_text())
    for key in ("elbo", "recon", "kl", "iw_nll", "mutual_info"):
        assert again[key] == pytest.approx(metrics[key], rel=1e-6), key
    assert again["active_units"] == metrics["active_units"]
    assert (ws / reports / "summary.md").is_file()
