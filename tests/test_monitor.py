"""Drift monitoring: the decision checked against a plain computation, and the `monitor` flow
end to end on real Fashion-MNIST images (a folder source, as a team's landing area)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

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
