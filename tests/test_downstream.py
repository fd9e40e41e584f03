"""The uses' measures: AUROC/AUPRC and the threshold, the few-label probe, the Frechet distance
(each against an independent computation), and, on a short real training without the class
Bag, that the anomaly benchmark and the probe beat chance and the pictures are drawn."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from PIL import Image

from vae_pipeline import pipeline
from vae_pipeline.config import ConfigError, build_config
from vae_pipeline.config.sections import ProbeConfig
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.data.errors import DataError
from vae_pipeline.evaluate import anomaly, downstream

from .conftest import tiny_params

# --- against plain reference computations ------------------------------------------------------


def _auroc_by_pairs(scores, is_anomaly):
    pos, neg = scores[is_anomaly], scores[~is_anomaly]
    wins = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def _average_precision_by_loop(scores, is_anomaly):
    order = np.argsort(-scores)
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if is_anomaly[i]:
            hits += 1
            total += hits / rank
    return total / is_anomaly.sum()


def test_auroc_and_auprc_match_pair_counting_and_a_ranking_loop():
    rng = np.random.default_rng(0)
    is_anomaly = rng.random(300) < 0.2
    scores = rng.normal(size=300) + 1.2 * is_anomaly  # anomalies score higher, with overlap
    auroc, auprc = downstream.auroc_auprc(scores, is_anomaly)
    assert auroc == pytest.approx(_auroc_by_pairs(scores, is_anomaly), abs=1e-12)
    assert auprc == pytest.approx(_average_precision_by_loop(scores, is_anomaly), abs=1e-12)
    assert 0.7 < auroc < 0.95  # separated, not perfectly
    assert downstream.auroc_auprc(-scores, is_anomaly)[0] == pytest.approx(1 - auroc)
    with pytest.raises(ValueError, match="both anomalies and normal"):
        downstream.auroc_auprc(scores, np.zeros(300, bool))


def test_the_threshold_flags_the_calibrated_share_of_normal_images():
    rng = np.random.default_rng(1)
    calibration, fresh = rng.gamma(5.0, 20.0, size=20000), rng.gamma(5.0, 20.0, size=20000)
    threshold = anomaly.calibrate_threshold(calibration, 99.0)
    assert (calibration > threshold).mean() == pytest.approx(0.01, abs=1e-4)
    assert (fresh > threshold).mean() == pytest.approx(0.01, abs=0.003)  # new normal images
    assert threshold == pytest.approx(np.sort(calibration)[int(0.99 * 19999)], rel=1e-3)
    with pytest.raises(ValueError, match="finite scores"):
        anomaly.calibrate_threshold(np.array([1.0, np.nan]), 99.0)


def test_label_draws_are_n_per_class_without_repeats_and_differ_between_draws():
    labels = np.repeat(np.arange(4), 30)
    labels[:5] = -1  # unlabelled rows are never drawn
    rng = np.random.default_rng(0)
    first, second = (
        downstream.draw_per_class(labels, 7, rng),
        downstream.draw_per_class(labels, 7, rng),
    )
    for drawn in (first, second):
        assert len(np.unique(drawn)) == len(drawn) == 28
        assert np.bincount(labels[drawn]).tolist() == [7, 7, 7, 7]
    assert not np.array_equal(first, second)
    assert downstream.draw_per_class(labels, 26, rng) is None  # class 0 has 25 labelled images


def test_the_probe_separates_separable_classes_and_reports_its_spread():
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, size=(3, 5))
    train_y, test_y = np.repeat(np.arange(3), 100), np.repeat(np.arange(3), 50)
    train_x = centers[train_y] + rng.normal(size=(300, 5))
    test_x = centers[test_y] + rng.normal(size=(150, 5))
    noise = rng.normal(size=(300, 5))  # features that carry no label information
    features = {
        "latent": (lambda p: train_x[p], test_x),
        "pixel": (lambda p: noise[p], rng.normal(size=(150, 5))),
    }
    pcfg = ProbeConfig(labels_per_class=[5, 50, 200], draws=4)
    metrics, per_draw, skipped = downstream.few_label_probe(train_y, test_y, features, pcfg)
    assert skipped == [200]  # 100 training images per class
    assert metrics["probe_latent_acc_n50"] > 0.9 > 0.6 > metrics["probe_pixel_acc_n50"]
    assert len(per_draw["latent"][5]) == 4
    assert metrics["probe_latent_acc_n5_std"] == pytest.approx(
        np.std(per_draw["latent"][5], ddof=1)
    )
    # One draw's accuracy is a plain logistic regression's on those examples.
    first = downstream.draw_per_class(train_y, 5, np.random.default_rng(pcfg.seed))
    alone = downstream.probe_accuracy(train_x[first], train_y[first], test_x, test_y)
    assert per_draw["latent"][5][0] == alone


def test_frechet_distance_matches_scipy_sqrtm_and_the_gaussian_closed_form():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3)) * [1.0, 2.0, 0.5]
    b = rng.normal(size=(4000, 3)) @ np.array([[1, 0.3, 0], [0, 1, 0.2], [0, 0, 1]]) + 0.7
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    by_scipy = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(
        s_a + s_b - 2 * scipy.linalg.sqrtm(s_a @ s_b).real
    )
    assert downstream.frechet_distance(a, b) == pytest.approx(by_scipy, rel=1e-8)
    assert downstream.frechet_distance(b, a) == pytest.approx(by_scipy, rel=1e-8)
    assert downstream.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # N(0, diag(1, 4, .25)) vs N(m, diag(s)): |m|^2 + sum (sqrt(v1) - sqrt(v2))^2, sampled.
    c = rng.normal(size=(200000, 3)) * [1.0, 2.0, 0.5]
    d = rng.normal(size=(200000, 3)) * [1.0, 1.0, 1.0] + [1.0, 0.0, 0.0]
    closed = 1.0 + (2.0 - 1.0) ** 2 + (0.5 - 1.0) ** 2
    assert downstream.frechet_distance(c, d) == pytest.approx(closed, rel=0.02)


def test_the_pca_basis_is_orthonormal_and_keeps_the_largest_variance():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) * [5, 1, 1, 1, 1, 0.1]
    mean, components = downstream.pca_basis(x, 2)
    assert np.allclose(components @ components.T, np.eye(2), atol=1e-10)
    assert abs(components[0, 0]) > 0.99  # the first direction is the high-variance axis
    assert downstream.project(x, (mean, components)).shape == (500, 2)


# --- on a short real training without the class Bag --------------------------------------------


def test_the_held_out_class_is_detected_well_above_chance(bagless):
    ws, cfg, _, metrics = bagless
    test = PreparedSplit(ws / cfg.data.prepared_dir, "test")
    bag = test.manifest["label_names"].index("Bag")
    is_bag = np.asarray(test.labels) == bag
    assert metrics["holdout_class"] == "Bag" and 0.05 < metrics["anomaly_fraction"] < 0.15
    assert metrics["anomaly_auroc"] > 0.75  # chance is 0.5
    assert metrics["anomaly_auprc"] > 2 * is_bag.mean()  # chance is the share of anomalies
    # The stored per-example scores (anomaly.score: typicality) give the same AUROC by pair
    # counting; and they are the typicality of the stored IW bounds under the stored reference.
    scores = np.load(ws / "reports" / downstream.ANOMALY_SCORES)
    images = to_unit_float(test.tensor())
    length, floor = anomaly.complexity(images, "bernoulli", bagless[2].content_box)
    iw = np.load(ws / "reports" / "per_example_iw_nll.npy")
    terms = {"iw_log_px": -iw, "complexity": length, "floor": floor}
    again = anomaly.anomaly_scores(terms, "typicality", metrics["anomaly_reference"])
    np.testing.assert_allclose(scores, again, rtol=1e-9)
    assert metrics["anomaly_auroc"] == pytest.approx(_auroc_by_pairs(scores, is_bag), abs=1e-9)
    # The threshold: p99 of validation scores flags about 1% of the normal test images, and
    # flags held-out images far more often.
    flagged = scores > metrics["anomaly_threshold"]
    assert metrics["anomaly_flag_rate_normal"] == pytest.approx(flagged[~is_bag].mean())
    assert metrics["anomaly_flag_rate_normal"] < 0.05
    assert metrics["anomaly_recall"] == pytest.approx(flagged[is_bag].mean())
    assert metrics["anomaly_recall"] > 3 * metrics["anomaly_flag_rate_normal"]


def test_training_and_validation_never_saw_the_held_out_class(bagless):
    ws, cfg, _, _ = bagless
    prepared = ws / cfg.data.prepared_dir
    full, kept = PreparedSplit(prepared, "train"), PreparedSplit(prepared, "train", 8)
    assert (full.labels == 8).sum() > 100 and (kept.labels != 8).all()
    assert len(kept) == len(full) - (full.labels == 8).sum()
    rows = np.flatnonzero(np.asarray(full.labels) != 8)[:5]
    assert torch.equal(kept.take(np.arange(5)), full.take(rows))
    meta = torch.load(ws / "models" / "model.pt", weights_only=True)
    assert meta["holdout_class"] == "Bag"


def test_the_probe_beats_chance_and_is_shown_beside_raw_pixels(bagless):
    ws, _, _, metrics = bagless
    assert metrics["probe_chance"] == pytest.approx(0.1)
    for n in (10, 50):
        assert metrics[f"probe_latent_acc_n{n}"] > 0.4  # 4x chance after a short training
        assert metrics[f"probe_pixel_acc_n{n}"] > 0.4
        assert 0 <= metrics[f"probe_latent_acc_n{n}_std"] < 0.1
    assert metrics["probe_latent_acc_n50"] > metrics["probe_latent_acc_n10"]
    summary = (ws / "reports" / "summary.md").read_text()
    lat, pix = metrics["probe_latent_acc_n50"], metrics["probe_pixel_acc_n50"]
    assert "| few-label probe, 50 labels/class |" in summary and f"{lat:.3f} ±" in summary
    assert f"vs {pix:.3f} ±" in summary


def test_sample_fd_is_positive_and_real_images_score_lower(bagless):
    _, _, _, metrics = bagless
    assert metrics["sample_fd_images"] == 500
    assert metrics["sample_fd"] > metrics["sample_fd_reference"] > 0


def test_the_pictures_and_metrics_json(bagless):
    ws, _, _, metrics = bagless
    reports = ws / "reports"
    for name in ("latent_pca.png", "anomaly_scores.png", "probe.png"):
        width, height = Image.open(reports / name).size
        assert width >= 500 and height >= 350, name
    stored = json.loads((reports / "metrics.json").read_text())
    assert stored["anomaly_auroc"] == metrics["anomaly_auroc"]
    assert stored["uses_key"].startswith("holdout=Bag|score=typicality|pct=99.0")
    assert (
        "| anomaly detection (held-out class `Bag`) | AUROC |"
        in (reports / "summary.md").read_text()
    )


def test_a_model_is_evaluated_only_with_the_class_it_was_trained_without(bagless):
    ws, cfg, _, _ = bagless
    other = cfg.model_copy(
        update={"anomaly": cfg.anomaly.model_copy(update={"holdout_class": "Coat"})}
    )
    with pytest.raises(ValueError, match="trained without class 'Bag'.*holdout_class=Bag"):
        pipeline.evaluate_model(other, "models", ws)
    none = cfg.model_copy(
        update={"anomaly": cfg.anomaly.model_copy(update={"holdout_class": None})}
    )
    with pytest.raises(ValueError, match="holdout_class=Bag"):
        pipeline.evaluate_model(none, "models", ws)


def test_an_unknown_held_out_class_is_refused_before_training_naming_the_labels(bagless, tmp_path):
    ws, cfg, _, _ = bagless
    bad = cfg.model_copy(
        update={"anomaly": cfg.anomaly.model_copy(update={"holdout_class": "Hat"})}
    )
    with pytest.raises(DataError, match=r"anomaly.holdout_class='Hat' is not a label.*8=Bag"):
        pipeline.train(bad, ws, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_params_validate_the_uses_sections():
    with pytest.raises(ConfigError, match="probe.labels_per_class"):
        build_config(tiny_params(probe={"labels_per_class": [10, 10]}))
    with pytest.raises(ConfigError, match="anomaly.threshold_percentile"):
        build_config(tiny_params(anomaly={"threshold_percentile": 100}))
    with pytest.raises(ConfigError, match="promotion.floors: unknown metric 'probe_latent_acc_n7'"):
        build_config(tiny_params(promotion={"floors": {"probe_latent_acc_n7": 0.01}}))
    cfg = build_config(tiny_params(anomaly={"holdout_class": 8}))
    assert cfg.anomaly.holdout_class == "8"


def test_typicality_flags_what_fools_the_likelihood_on_the_short_training(bagless):
    """The benchmark's small version (bench/anomaly_ood.py): black and white images and noise
    patches of 8x8, 20x20 and 28x28 centred on black, as the ingest rule fits them. The
    likelihood calls black and the 8x8 patch *more* normal than the test images (it flags
    neither); the stored typicality score flags every one, and about 1% of the test images."""
    from vae_pipeline.data.images import fit_array
    from vae_pipeline.evaluate.estimator import per_example_terms

    ws, cfg, model, metrics = bagless
    rng = np.random.default_rng(0)
    raw = [np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)]
    raw += [rng.integers(0, 256, (1, s, s), dtype=np.uint8) for s in (8, 20, 28) for _ in range(8)]
    images = torch.from_numpy(np.stack([fit_array(a, 32) for a in raw]))
    terms = per_example_terms(model, images, cfg.evaluate, torch.device("cpu"))
    flags = anomaly.anomaly_scores(terms, "typicality", metrics["anomaly_reference"])
    assert (flags > metrics["anomaly_threshold"]).all(), flags
    test_nll = np.load(ws / "reports" / "per_example_iw_nll.npy")
    black_and_8x8 = -terms["iw_log_px"][[0, *range(2, 10)]]
    assert (black_and_8x8 < np.median(test_nll)).all()  # the likelihood's failure mode
    assert 0.002 <= metrics["anomaly_flag_rate_normal"] <= 0.03
