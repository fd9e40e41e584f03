"""Drift monitoring: the decision checked against a plain computation, and the `monitor` flow
end to end on real Fashion-MNIST images (a folder source, as a team's landing area)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import t as student_t

from vae_pipeline.config import load_config
from vae_pipeline.config.environment import tracking_uri
from vae_pipeline.config.sections import MonitorConfig
from vae_pipeline.monitor.check import known_hashes, new_images
from vae_pipeline.monitor.drift import MonitorError, drift_decision, mmd_test

from .conftest import REPO, fashion_mnist_pngs, make_workspace
from .drift_images import drawn_digits, fashion_test_images, save_pngs


def make_workspace_params():
    return REPO / "params.yaml"


def _reference_interval(new, ref, alpha):
    """Welch's stderr of a difference of means and the two-sided t interval, by hand."""
    n, m = len(new), len(ref)
    mean_new, mean_ref = sum(new) / n, sum(ref) / m
    var_new = sum((v - mean_new) ** 2 for v in new) / (n - 1)
    var_ref = sum((v - mean_ref) ** 2 for v in ref) / (m - 1)
    stderr = math.sqrt(var_new / n + var_ref / m)
    shift = mean_new - mean_ref
    a, b = var_new / n, var_ref / m
    df = (a + b) ** 2 / (a**2 / (n - 1) + b**2 / (m - 1))  # Welch-Satterthwaite
    half = student_t.ppf(1 - alpha / 2, df) * stderr
    return shift, stderr, shift - half, shift + half


@pytest.mark.parametrize("offset", [0.0, 3.0, 40.0, -3.0, -40.0])
def test_likelihood_check_is_two_sided_and_matches_a_hand_computation(offset):
    rng = np.random.default_rng(1)
    ref = rng.normal(300.0, 25.0, size=400)
    new = rng.normal(300.0 + offset, 30.0, size=150)
    mcfg = MonitorConfig(threshold_nats=5.0, confidence=0.95)
    d = drift_decision(new, ref, mcfg)  # the likelihood check alone: level 0.05
    shift, stderr, lower, upper = _reference_interval(new.tolist(), ref.tolist(), 0.05)
    assert d.shift == pytest.approx(shift, rel=1e-12)
    assert d.stderr == pytest.approx(stderr, rel=1e-12)
    assert d.lower_bound == pytest.approx(lower, rel=1e-12)
    assert d.upper_bound == pytest.approx(upper, rel=1e-12)
    assert d.drift == (lower > 5.0 or upper < -5.0) == d.retrain
    # noise and small shifts do not trigger; 40 nats does, worse (+) or better (-): images
    # from a simpler domain score better than the test set and are drift too
    assert d.drift == (abs(offset) == 40.0)
    assert [c["name"] for c in d.checks] == ["likelihood"] and "latent check not run" in d.reason


def test_noise_alone_rarely_triggers_at_the_confidence_level():
    """With no shift at all and threshold 0, the 95% interval misses 0 about 5% of the time."""
    rng = np.random.default_rng(2)
    mcfg = MonitorConfig(threshold_nats=0.0, confidence=0.95)
    hits = sum(
        drift_decision(rng.normal(0, 1, 200), rng.normal(0, 1, 200), mcfg).drift
        for _ in range(2000)
    )
    assert 0.03 < hits / 2000 < 0.07


def _mmd2_by_loops(x, y, h):
    k = lambda a, b: math.exp(-sum((ai - bi) ** 2 for ai, bi in zip(a, b, strict=True)) / h)  # noqa: E731
    n, m = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(a, b) for a in x for b in y) / (n * m)
    return xx + yy - 2 * xy


def test_mmd_statistic_matches_plain_loops_and_its_bandwidth_is_the_median_distance():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0, 1, (7, 3)), rng.normal(0.5, 1, (9, 3))
    mmd2, p, h = mmd_test(x, y, permutations=50, seed=0)
    pool = np.vstack([x, y])
    d2 = [((pool[i] - pool[j]) ** 2).sum() for i in range(16) for j in range(i + 1, 16)]
    assert h == pytest.approx(float(np.median(d2)), rel=1e-12)
    assert mmd2 == pytest.approx(_mmd2_by_loops(x.tolist(), y.tolist(), h), rel=1e-9, abs=1e-12)
    assert 1 / 51 <= p <= 1


def _mmd_p_by_loops(x, y, permutations, seed, h):
    """The permutation p-value by a plain loop over the same draws as mmd_test (one
    `rng.permutation` of the pooled labels, x's first, per permutation): the observed sample
    counts as one of the permutations, so p = (1 + #{null >= observed}) / (1 + permutations)."""
    pool, n = np.vstack([x, y]).tolist(), len(x)
    observed = _mmd2_by_loops(pool[:n], pool[n:], h)
    rng = np.random.default_rng(seed)
    labels = np.zeros(len(pool), bool)
    labels[:n] = True
    reached = 0
    for _ in range(permutations):
        in_x = rng.permutation(labels)
        xs = [pool[i] for i in range(len(pool)) if in_x[i]]
        ys = [pool[i] for i in range(len(pool)) if not in_x[i]]
        reached += _mmd2_by_loops(xs, ys, h) >= observed
    return (1 + reached) / (1 + permutations)


def test_mmd_p_value_counts_the_observed_sample_among_the_permutations():
    rng = np.random.default_rng(5)
    x, y = rng.normal(0, 1, (6, 2)), rng.normal(0.6, 1, (8, 2))  # overlapping: 0 < count < P
    _, p, h = mmd_test(x, y, permutations=150, seed=2)
    expected = _mmd_p_by_loops(x, y, 150, 2, h)
    assert 1 / 151 < expected < 1 and p == pytest.approx(expected, abs=1e-12)
    # well separated: no permutation reaches the observed value, yet p is 1/(P+1), never 0
    far = mmd_test(rng.normal(0, 1, (20, 3)), rng.normal(50, 1, (20, 3)), 99, 0)[1]
    assert far == pytest.approx(1 / 100, abs=1e-15)
    # identical pools: every permutation reaches the observed value, p = 1
    same = np.ones((5, 2))
    assert mmd_test(same, same, 40, 0)[1] == 1.0


def test_mmd_permutation_test_is_calibrated_and_sees_a_shift():
    """p-values of same-distribution samples are uniform (about 5% at or below 0.05); a shift of
    half a standard deviation in 4 of 8 dimensions is found at n = 100."""
    rng = np.random.default_rng(4)
    null = [
        mmd_test(rng.normal(0, 1, (30, 8)), rng.normal(0, 1, (60, 8)), 100, seed)[1]
        for seed in range(300)
    ]
    assert 0.02 <= np.mean(np.asarray(null) <= 0.05) <= 0.09
    shifted = rng.normal(0, 1, (100, 8))
    shifted[:, :4] += 0.5
    assert mmd_test(shifted, rng.normal(0, 1, (200, 8)), 200, 0)[1] <= 0.01


def test_checks_combine_at_the_bonferroni_level():
    """With both checks, each runs at (1 - confidence) / 2, and either one firing is drift."""
    rng = np.random.default_rng(5)
    ref, new = rng.normal(300, 25, 400), rng.normal(300, 25, 150)
    ref_mu, new_mu = rng.normal(0, 1, (300, 4)), rng.normal(0, 1, (150, 4))
    mcfg = MonitorConfig(threshold_nats=5.0, confidence=0.9, permutations=100)
    quiet = drift_decision(new, ref, mcfg, new_mu=new_mu, ref_mu=ref_mu)
    _, _, lower, upper = _reference_interval(new.tolist(), ref.tolist(), 0.05)
    assert (quiet.lower_bound, quiet.upper_bound) == pytest.approx((lower, upper), rel=1e-12)
    assert [c["name"] for c in quiet.checks] == ["likelihood", "latent"]
    assert quiet.checks[1]["bound"] == pytest.approx(0.05) and not quiet.drift
    moved = new_mu.copy()
    moved[:, 0] += 1.5  # same likelihood, other codes: the latent check alone fires
    d = drift_decision(new, ref, mcfg, new_mu=moved, ref_mu=ref_mu)
    assert d.drift and [c["fired"] for c in d.checks] == [False, True]
    assert d.mmd_p <= 0.05 and d.reason.startswith("drift (latent check fired)")


def test_always_retrains_without_calling_it_drift():
    same = np.linspace(100, 200, 50)
    d = drift_decision(same, same, MonitorConfig(), always=True)
    assert d.retrain and not d.drift and "always_retrain" in d.reason
    with pytest.raises(MonitorError, match="at least 2"):
        drift_decision(np.array([1.0]), same, MonitorConfig())


def test_fashion_mnist_is_not_snapshotted_for_the_monitor(tmp_path):
    from vae_pipeline.monitor.check import snapshot

    cfg = load_config(make_workspace(tmp_path / "ws") / "params.yaml")
    folder, why = snapshot(cfg, "fashion-mnist", tmp_path)
    assert folder is None and why.startswith("fashion-mnist is a fixed dataset")
    assert not (tmp_path / cfg.monitor.snapshot_dir).exists()


def test_an_image_larger_than_the_content_box_is_fitted_into_it(tmp_path):
    """The champion's training data (28x28 padded into 32x32) has content box [2, 2, 28, 28]:
    64x64 and 56x56 RGB JPEGs of the same images are resized into the box inside a black
    frame, close to the training tensors; the square rule alone fills the frame (far off).
    A 28x28 file, or no box, keeps prepare's own rule exactly."""
    import torch
    from PIL import Image

    from tests.drift_images import save_jpegs
    from vae_pipeline.data.images import describe_fitting, fit_image, fit_into_box, load_image
    from vae_pipeline.data.preparation import fit_fashion_mnist

    images = fashion_test_images(0, 50)
    prepared = fit_fashion_mnist(torch.from_numpy(images), 32, 1).astype(int)
    box = [2, 2, 28, 28]
    for size in (64, 56):
        files = sorted(save_jpegs(images, tmp_path / f"jpg{size}", size=size).glob("*.jpg"))
        boxed = np.stack([fit_into_box(load_image(f, 1), 32, box) for f in files])
        filled = np.stack([fit_into_box(load_image(f, 1), 32, None) for f in files])
        frame = np.ones((32, 32), bool)
        frame[2:30, 2:30] = False
        assert boxed[:, :, frame].max() == 0  # black outside the box, as in training
        assert np.abs(boxed - prepared).mean() < 8  # the same images, resampled twice
        assert np.abs(filled - prepared).mean() > 20  # the old rule: scaled over the border
    native = sorted(save_pngs(images, tmp_path / "native").glob("*.png"))
    got = np.stack([fit_into_box(load_image(f, 1), 32, box) for f in native])
    np.testing.assert_array_equal(got, prepared)
    assert describe_fitting(32, box).startswith("into content box [2, 2, 28, 28]")

    img = Image.fromarray(np.full((20, 40, 3), 200, np.uint8))  # 40 wide, 20 high
    assert np.array_equal(fit_into_box(img, 32, None), fit_image(img, 32))
    out = fit_into_box(img, 32, [1, 4, 30, 24])  # a box that is not square
    assert out.shape == (3, 32, 32) and out[:, 1:31, 4:28].min() == 200
    out[:, 1:31, 4:28] = 0
    assert out.max() == 0


def test_re_encoded_images_of_the_prepared_data_are_not_new(tmp_path):
    """`known_hashes` holds file-byte hashes (folder sources) or raw-pixel hashes (IDX): a
    PNG saved again at another compression level, or a 28x28 PNG of an image the IDX data
    holds, passes that filter; its fitted pixels equal a prepared image's, so it is dropped."""
    from PIL import Image

    from vae_pipeline.config import build_config
    from vae_pipeline.data.preparation import content_hash, prepare
    from vae_pipeline.data.sources import snapshot_source
    from vae_pipeline.monitor.check import drop_known_pixels, prepared_pixel_hashes

    from .conftest import tiny_params

    # a folder source of 28x28 PNGs, re-saved uncompressed
    source = save_pngs(fashion_test_images(0, 80), tmp_path / "src")
    cfg = build_config(tiny_params(data={"source": str(source), "limit": None}))
    snapshot_source(cfg, tmp_path / "folder")
    prepare(cfg, tmp_path / "folder")
    landing = tmp_path / "landing"
    landing.mkdir()
    for path in sorted(source.glob("*.png"))[:10]:
        Image.open(path).save(landing / path.name, compress_level=0)
        assert content_hash((landing / path.name).read_bytes()) != content_hash(path.read_bytes())
    save_pngs(fashion_test_images(9000, 5), tmp_path / "unseen")
    for path in (tmp_path / "unseen").glob("*.png"):
        path.rename(landing / f"new{path.name}")
    fresh = new_images(landing, known_hashes(cfg, tmp_path / "folder"))
    assert len(fresh) == 15  # the bytes differ
    pixels = prepared_pixel_hashes(cfg, tmp_path / "folder")
    assert len(pixels) == 80
    kept, known = drop_known_pixels(cfg, fresh, pixels, [2, 2, 28, 28])
    assert known == 10 and sorted(p.name for p in kept) == [f"newimg0000{i}.png" for i in range(5)]

    # the IDX source: its index holds hashes of raw pixels, never a PNG's bytes
    idx_cfg = build_config(tiny_params(data={"limit": 300}))
    snapshot_source(idx_cfg, tmp_path / "idx")
    prepare(idx_cfg, tmp_path / "idx")  # its test split: t10k[0..300)
    pngs = save_pngs(fashion_test_images(0, 10), tmp_path / "t10k")
    save_pngs(fashion_test_images(9000, 3), tmp_path / "t10k-new")
    for path in (tmp_path / "t10k-new").glob("*.png"):
        path.rename(pngs / f"new{path.name}")
    fresh = new_images(pngs, known_hashes(idx_cfg, tmp_path / "idx"))
    assert len(fresh) == 13
    pixels = prepared_pixel_hashes(idx_cfg, tmp_path / "idx")
    kept, known = drop_known_pixels(idx_cfg, fresh, pixels)
    assert known == 10 and [p.name for p in kept] == [f"newimg0000{i}.png" for i in range(3)]


def test_monitor_no_retrain_reaches_the_flow(tmp_path, monkeypatch):
    """`vae-pipeline monitor --no-retrain` runs the flow with retrain=False (the flow's own
    behaviour is checked on the champion below)."""
    import flows.monitor
    from vae_pipeline.cli import main

    calls = []
    monkeypatch.setattr(flows.monitor, "monitor", lambda **kw: calls.append(kw))
    ws = make_workspace(tmp_path / "ws")
    (ws / "landing").mkdir()
    monkeypatch.chdir(ws)
    assert main(["monitor", "--source", "landing", "--no-retrain"]) == 0
    assert main(["monitor", "--source", "landing"]) == 0
    assert [c["retrain"] for c in calls] == [False, True]


@pytest.fixture(scope="module")
def champion_ws(tmp_path_factory):
    """A champion trained (retrain flow) on 1,000 Fashion-MNIST images in a folder source."""
    from flows.retrain import retrain

    root = tmp_path_factory.mktemp("monitor")
    ws = make_workspace(
        root / "ws",
        data={"source": "incoming", "limit": None},
        train={"epochs": 2},
        promotion={"min_active_units": 0},
        monitor={"max_images": 400, "threshold_nats": 5.0},
    )
    fashion_mnist_pngs(ws / "incoming", 0, 1000)
    first = retrain(workdir=str(ws))
    assert first["decision"]["promoted"]
    return ws


@pytest.mark.slow
def test_the_operator_cases_get_the_right_answer(champion_ws, tmp_path):
    """The cases operators meet, as folders beside the data: clothing the champion never saw,
    padded to 32 or at its native 28x28 (the same tensors: no drift either way); drawn digits
    (another domain, simpler than clothing) and inverted clothing (drift)."""
    from vae_pipeline.monitor.check import check_drift

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    clothes = fashion_test_images(2000, 300)
    cases = {
        "padded": (save_pngs(clothes, tmp_path / "padded", size=32), False),
        "native": (save_pngs(clothes, tmp_path / "native"), False),
        "digits": (save_pngs(drawn_digits(300, 0), tmp_path / "digits"), True),
        "inverted": (save_pngs(255 - clothes, tmp_path / "inverted"), True),
    }
    reports = {}
    for name, (folder, drift) in cases.items():
        r = check_drift(cfg, uri, champion_ws, str(folder))
        lines = [c["line"] for c in r["checks"]]
        assert r["drift"] == r["retrain"] == drift, (name, r["reason"], lines)
        assert r["new_images"] == r["new_n"] == 300 and len(r["checks"]) == 2, (name, lines)
        reports[name] = r
    padded, native = reports["padded"], reports["native"]
    assert (native["shift"], native["mmd2"]) == (padded["shift"], padded["mmd2"])
    assert padded["lower_bound"] <= 5.0 <= padded["upper_bound"] or abs(padded["shift"]) < 5
    assert reports["inverted"]["lower_bound"] > 5.0  # far less likely
    assert reports["digits"]["mmd_p"] <= 0.025  # other codes, whatever the likelihood says


@pytest.mark.slow
def test_larger_jpegs_of_the_same_images_are_fitted_into_the_content_box(champion_ws, tmp_path):
    """Clothing the champion never saw, stored as 64x64 RGB JPEGs (quality 95): fitted into
    the training data's content box, no drift; the square rule alone (the monitor before)
    scales them over the black border and the likelihood check fires on preprocessing."""
    from tests.drift_images import save_jpegs
    from vae_pipeline.monitor.check import champion_reference, check_drift, load_images, score
    from vae_pipeline.tracking import download_weights
    from vae_pipeline.train.checkpoint import load_model

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    jpegs = save_jpegs(fashion_test_images(5000, 300), tmp_path / "jpegs", size=64)
    r = check_drift(cfg, uri, champion_ws, str(jpegs))
    lines = [c["line"] for c in r["checks"]]
    assert not r["drift"] and not r["retrain"], (r["reason"], lines)
    assert r["new_images"] == r["new_n"] == 300 and len(r["checks"]) == 2, lines
    assert r["fitting"].startswith("into content box [2, 2, 28, 28] (top, left, height, width)")

    mv, reference = champion_reference(cfg, uri)
    model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
    _, filled = load_images(cfg, jpegs, sorted(jpegs.glob("*.jpg")), 300, 0)  # no box
    scores, _ = score(cfg, model, filled, "none", cfg.monitor.seed)
    assert drift_decision(scores, reference, cfg.monitor).lower_bound > 5.0


@pytest.mark.slow
def test_re_encodings_of_prepared_images_are_dropped_as_already_known(champion_ws, tmp_path):
    """100 of the source's own PNGs saved again uncompressed (other bytes, the same pixels)
    beside 100 unseen images: 100 new, 100 already known; re-encodings alone: nothing new."""
    from PIL import Image

    from flows.monitor import format_report
    from vae_pipeline.monitor.check import check_drift

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    again = tmp_path / "again"
    again.mkdir()
    for path in sorted((champion_ws / "incoming").glob("*/*.png"))[:100]:
        Image.open(path).save(again / path.name, compress_level=0)
    mixed = save_pngs(fashion_test_images(6000, 100), tmp_path / "mixed")
    for path in again.glob("*.png"):
        (mixed / f"again-{path.name}").write_bytes(path.read_bytes())
    r = check_drift(cfg, uri, champion_ws, str(mixed))
    assert (r["new_images"], r["already_known"], r["new_n"]) == (100, 100, 100), r["reason"]
    assert not r["drift"], r["reason"]
    first = format_report({**r, "started": None}).splitlines()[0]
    assert first.startswith("monitor: 100 new of 200 images in ")
    assert "(100 more already known: the pixels of prepared images)" in first

    r = check_drift(cfg, uri, champion_ws, str(again))
    assert (r["new_images"], r["already_known"]) == (0, 100) and not r["retrain"]
    assert "(100 more with the pixels of prepared images)" in r["reason"]


@pytest.mark.slow
def test_monitor_without_retrain_reports_the_decision_and_starts_nothing(
    champion_ws, tmp_path, capsys
):
    from mlflow.tracking import MlflowClient

    from flows.monitor import monitor

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    client = MlflowClient(uri, registry_uri=uri)
    versions = len(client.search_model_versions("name='conv-vae'"))
    inverted = save_pngs(255 - fashion_test_images(7000, 200), tmp_path / "inverted")
    report = monitor(workdir=str(champion_ws), source=str(inverted), retrain=False)
    assert report["drift"] and report["retrain"] and report["started"] is None
    assert report["not_started"] == "drift: a retrain would start; not started (--no-retrain)"
    assert len(client.search_model_versions("name='conv-vae'")) == versions
    assert "  drift: a retrain would start; not started (--no-retrain)" in capsys.readouterr().out
    clothes = save_pngs(fashion_test_images(7500, 200), tmp_path / "clothes")
    forced = monitor(workdir=str(champion_ws), source=str(clothes), always=True, retrain=False)
    why = "drift" if forced["drift"] else "always_retrain"  # no drift but 5% of the time
    assert forced["retrain"] and forced["started"] is None
    assert forced["not_started"] == f"{why}: a retrain would start; not started (--no-retrain)"
    assert len(client.search_model_versions("name='conv-vae'")) == versions


@pytest.mark.slow
def test_in_distribution_samples_rarely_raise_a_false_alarm(champion_ws):
    """Samples of clothing the champion never saw, of several sizes, against its test set:
    the decision's false-alarm rate stays within 1 - monitor.confidence (5%)."""
    import torch

    from vae_pipeline.data.preparation import fit_fashion_mnist
    from vae_pipeline.monitor.check import champion_reference, reference_images, score
    from vae_pipeline.tracking import download_weights
    from vae_pipeline.train.checkpoint import load_model

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    mv, reference = champion_reference(cfg, uri)
    model, _ = load_model(download_weights(uri, f"models:/{mv.name}/{mv.version}"))
    ref_images, why = reference_images(cfg, model, champion_ws, 400, 0)
    assert ref_images is not None, why
    _, ref_mu = score(cfg, model, ref_images, "none", 1)
    pool = torch.from_numpy(
        fit_fashion_mnist(torch.from_numpy(fashion_test_images(2000, 8000)), 32, 1)
    )
    rng = np.random.default_rng(0)
    alarms = {}
    for size in (5, 30, 200):
        fired = 0
        for _ in range(30):
            scores, mu = score(
                cfg, model, pool[rng.choice(len(pool), size, replace=False)], "none", 0
            )
            fired += drift_decision(scores, reference, cfg.monitor, new_mu=mu, ref_mu=ref_mu).drift
        alarms[size] = fired
    assert max(alarms.values()) <= 4 and sum(alarms.values()) <= 8, alarms  # 90 trials at 5%


@pytest.mark.slow
def test_nothing_to_score_is_one_line_not_an_error(champion_ws, tmp_path):
    from flows.monitor import format_report
    from vae_pipeline.monitor.check import check_drift

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    (tmp_path / "empty").mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    for i in range(3):
        (corrupt / f"x{i}.png").write_bytes(b"not a png")
    one = save_pngs(fashion_test_images(2000, 1), tmp_path / "one")
    for folder, why in [
        ("empty", "holds no images"),
        ("corrupt", "holds no usable images (3 unusable)"),
        ("one", "1 usable new image(s)"),
    ]:
        r = check_drift(cfg, uri, champion_ws, str(tmp_path / folder))
        assert not r["retrain"] and why in r["reason"] and "nothing to measure" in r["reason"]
        text = format_report({**r, "started": None})
        assert "nan" not in text and why in text and len(text.splitlines()) == 2
    assert one.is_dir()

    # As an operator runs it: one line on stderr, no Prefect traceback, naming monitor.source.
    cli = subprocess.run(
        [sys.executable, "-m", "vae_pipeline.cli", "monitor", "--source", "no-such-folder"],
        cwd=champion_ws,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 1
    err = cli.stderr.strip()
    assert err.startswith("vae-pipeline monitor: error: monitor.source 'no-such-folder' does")
    assert len(err.splitlines()) == 1 and "data.source" not in err


def test_a_cached_drift_retrain_says_it_learned_nothing():
    from flows.monitor import unchanged_note

    cfg = load_config(make_workspace_params())
    steps = [{"step": "train", "state": "Cached"}, {"step": "register", "state": "Completed"}]
    summary = {"steps": steps, "data_version": "abc"}
    note = unchanged_note(cfg, summary, "landing/")
    assert "reused an earlier training on data version abc" in note
    assert "monitor.retrain_on=monitored" in note
    assert "no image was added" in unchanged_note(cfg, summary, cfg.data.source)
    trained = {**summary, "steps": [{"step": "train", "state": "Completed"}]}
    assert unchanged_note(cfg, trained, "landing/") is None


@pytest.mark.slow
def test_monitor_retrains_on_a_shifted_snapshot_and_not_on_a_same_distribution_one(champion_ws):
    from mlflow.tracking import MlflowClient

    from flows.monitor import DRIFT_ARTIFACT, monitor

    ws = champion_ws
    cfg = load_config(ws / "params.yaml")
    uri = tracking_uri(cfg, ws)
    client = MlflowClient(uri, registry_uri=uri)
    versions = len(client.search_model_versions("name='conv-vae'"))

    # Nothing new yet: every image of the source is in the prepared data.
    report = monitor(workdir=str(ws))
    assert report["new_images"] == 0 and not report["retrain"] and report["started"] is None
    assert report["snapshot_images"] == 1000

    # 300 new images from the same distribution: measured, no retrain.
    fashion_mnist_pngs(ws / "incoming", 1000, 300)
    report = monitor(workdir=str(ws))
    assert report["new_images"] == 300 and report["new_n"] == 300
    assert not report["drift"] and report["started"] is None, report["reason"]
    assert report["lower_bound"] <= 5.0
    assert len(client.search_model_versions("name='conv-vae'")) == versions

    # 300 more, inverted (a new camera, a new background): drift, and a retrain on the new data.
    fashion_mnist_pngs(ws / "incoming", 1300, 300, invert=True)
    report = monitor(workdir=str(ws))
    assert report["drift"] and report["retrain"], report["reason"]
    assert report["new_images"] == 600 and report["lower_bound"] > 5.0
    started = report["started"]
    assert started["subflow"] == "retrain"
    assert int(started["model_version"]) == versions + 1
    data_version = client.get_model_version("conv-vae", started["model_version"]).tags[
        "data_version"
    ]
    assert data_version == started["data_version"]  # trained on the snapshot with the new images

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as prefect:
        artifacts = prefect.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[DRIFT_ARTIFACT]))
        )
    latest = max(artifacts, key=lambda a: a.created)
    assert latest.data.startswith("# monitor: drift")
    assert f"{report['new_mean']:.2f}" in latest.data and "retrain ran here" in latest.data


@pytest.mark.slow
def test_new_images_are_those_not_in_the_prepared_data(champion_ws, tmp_path):
    cfg = load_config(champion_ws / "params.yaml")
    known = known_hashes(cfg, champion_ws)
    assert len(known) >= 1000  # every image the prepared data holds
    folder = fashion_mnist_pngs(tmp_path / "mix", 0, 5)
    fashion_mnist_pngs(folder, 9000, 3)
    found = sorted(p.name for p in new_images(folder, known))
    assert found == ["img09000.png", "img09001.png", "img09002.png"]


@pytest.mark.slow
def test_a_check_of_fashion_mnist_reports_nothing_new(champion_ws):
    from vae_pipeline.monitor.check import check_drift

    cfg = load_config(champion_ws / "params.yaml")
    report = check_drift(cfg, tracking_uri(cfg, champion_ws), champion_ws, "fashion-mnist")
    assert not report["retrain"] and report["new_images"] == 0
    assert report["reason"].startswith("fashion-mnist is a fixed dataset")
    forced = check_drift(cfg, tracking_uri(cfg, champion_ws), champion_ws, "fashion-mnist", True)
    assert forced["retrain"] and not forced["drift"]


@pytest.mark.slow
def test_a_drift_retrain_learns_from_the_monitored_images(champion_ws, tmp_path):
    """monitor.source apart from data.source: the retrain a drift starts ingests the monitored
    source (monitor.retrain_on = monitored), so the new version's data holds those images."""
    from mlflow.tracking import MlflowClient

    from flows.monitor import monitor
    from vae_pipeline.data.preparation import content_hash

    ws = champion_ws
    cfg = load_config(ws / "params.yaml")
    uri = tracking_uri(cfg, ws)
    client = MlflowClient(uri, registry_uri=uri)
    landing = save_pngs(drawn_digits(400, 1), tmp_path / "landing" / "digit")
    report = monitor(workdir=str(ws), source=str(tmp_path / "landing"))
    assert report["drift"], report["reason"]
    started = report["started"]
    assert started["source"] == str(tmp_path / "landing") and started["note"] is None
    mv = client.get_model_version("conv-vae", started["model_version"])
    assert mv.tags["data_version"] == started["data_version"]
    manifest = json.loads((ws / "data/prepared/manifest.json").read_text())
    assert manifest["data_version"] == started["data_version"]
    assert manifest["source"] == str((tmp_path / "landing").resolve())
    prepared = known_hashes(cfg, ws)
    digits = {content_hash(p.read_bytes()) for p in landing.glob("*.png")}
    assert digits <= prepared and len(prepared) == 400  # the monitored images, as its data


@pytest.mark.slow
def test_the_latent_reference_is_the_champions_test_data_whatever_the_workspace_holds(
    champion_ws, tmp_path
):
    """A retrain on other data (rejected or not) leaves data/prepared holding that data. The
    latent check still compares with the champion's own test split: the encoder means its
    evaluation stored with its run. Without them, a prepared split of another data version is
    refused by name rather than used."""
    import shutil
    from urllib.parse import urlparse

    from mlflow.tracking import MlflowClient

    from vae_pipeline.evaluate import LATENT_MEANS
    from vae_pipeline.monitor.check import check_drift
    from vae_pipeline.registry.versions import champion

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    mv = champion(MlflowClient(uri, registry_uri=uri), "conv-vae")
    prepared = champion_ws / "data/prepared"
    backup = tmp_path / "prepared"
    shutil.copytree(prepared, backup)
    clothes = save_pngs(fashion_test_images(4000, 300), tmp_path / "clothes", size=32)
    before = check_drift(cfg, uri, champion_ws, str(clothes))
    try:
        # the workspace's test split becomes drawn digits of another data version
        digits = np.zeros((400, 1, 32, 32), np.uint8)
        digits[:, 0, 2:30, 2:30] = drawn_digits(400, 3)
        np.save(prepared / "test_images.npy", digits)
        manifest = json.loads((prepared / "manifest.json").read_text())
        (prepared / "manifest.json").write_text(json.dumps({**manifest, "data_version": "other"}))
        r = check_drift(cfg, uri, champion_ws, str(clothes))
        # the same answer as with the champion's data in place: the workspace does not matter
        assert (r["drift"], r["mmd2"], r["mmd_p"]) == (
            before["drift"],
            before["mmd2"],
            before["mmd_p"],
        )
        assert r["latent_reference"].startswith(f"v{mv.version}'s test split")
        assert [c["name"] for c in r["checks"]] == ["likelihood", "latent"]

        client = MlflowClient(uri, registry_uri=uri)
        artifacts = urlparse(client.get_run(mv.run_id).info.artifact_uri).path  # a local store
        (Path(artifacts) / "reports" / LATENT_MEANS).unlink()
        r = check_drift(cfg, uri, champion_ws, str(clothes))
        assert [c["name"] for c in r["checks"]] == ["likelihood"], r["reason"]
        assert f"tested on data version {mv.tags['test_data_version']}" in r["reason"]
        assert "the prepared test split here is data version other" in r["reason"]
    finally:
        shutil.rmtree(prepared)
        shutil.copytree(backup, prepared)


@pytest.mark.slow
def test_a_retrain_on_other_data_is_judged_on_the_champions_test_data_too(champion_ws, tmp_path):
    """A retrain on 400 drawn digits is evaluated on their own small test split, where it may
    well beat the clothing champion; the gate also compares both on the champion's test data
    (rebuilt from DVC: data/prepared holds the digits now) and keeps the champion; both
    comparisons are reported, and the summary says what the workspace now holds."""
    from mlflow.tracking import MlflowClient

    from flows.retrain import retrain
    from vae_pipeline.registry.history import history
    from vae_pipeline.registry.versions import champion

    cfg = load_config(champion_ws / "params.yaml")
    uri = tracking_uri(cfg, champion_ws)
    client = MlflowClient(uri, registry_uri=uri)
    before = champion(client, "conv-vae")
    digits = save_pngs(drawn_digits(400, 7), tmp_path / "digits" / "digit")
    summary = retrain(workdir=str(champion_ws), source=str(tmp_path / "digits"))
    decision = summary["decision"]
    pinned = decision["pinned"]
    assert not decision["promoted"] and not pinned["promoted"], decision["reason"]
    assert pinned["data_version"] == before.tags["test_data_version"]
    assert pinned["examples"] == int(float(before.tags["n_examples"]))
    where = f"v{before.version}'s test data (data version {pinned['data_version']}"
    assert where in decision["reason"]
    assert "the new data's test split (" in decision["reason"]
    assert str(champion(client, "conv-vae").version) == str(before.version)
    assert history(client, "conv-vae")[-1]["pinned"]["data_version"] == pinned["data_version"]
    assert summary["data_version"] in summary["workspace_note"]
    assert len(list(digits.glob("*.png"))) == 400
