"""Drift monitoring: the decision checked against a plain computation, and the `monitor` flow
end to end on real Fashion-MNIST images (a folder source, as a team's landing area)."""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from vae_pipeline.config import MonitorConfig, load_config, tracking_uri
from vae_pipeline.monitor import MonitorError, drift_decision, known_hashes, new_images

from .conftest import fashion_mnist_pngs, make_workspace


def _reference_bound(new, ref, confidence):
    """Welch's stderr of a difference of means, written out by hand."""
    n, m = len(new), len(ref)
    mean_new, mean_ref = sum(new) / n, sum(ref) / m
    var_new = sum((v - mean_new) ** 2 for v in new) / (n - 1)
    var_ref = sum((v - mean_ref) ** 2 for v in ref) / (m - 1)
    stderr = math.sqrt(var_new / n + var_ref / m)
    shift = mean_new - mean_ref
    return shift, stderr, shift - NormalDist().inv_cdf(confidence) * stderr


@pytest.mark.parametrize("offset", [0.0, 3.0, 40.0])
def test_drift_decision_matches_a_hand_computation(offset):
    rng = np.random.default_rng(1)
    ref = rng.normal(300.0, 25.0, size=400)
    new = rng.normal(300.0 + offset, 30.0, size=150)
    mcfg = MonitorConfig(threshold_nats=5.0, confidence=0.95)
    d = drift_decision(new, ref, mcfg)
    shift, stderr, lower = _reference_bound(new.tolist(), ref.tolist(), 0.95)
    assert d.shift == pytest.approx(shift, rel=1e-12)
    assert d.stderr == pytest.approx(stderr, rel=1e-12)
    assert d.lower_bound == pytest.approx(lower, rel=1e-12)
    assert d.drift == (lower > 5.0) == d.retrain
    assert d.drift == (offset == 40.0)  # noise and a small shift do not trigger; 40 nats does


def test_noise_alone_rarely_triggers_at_the_confidence_level():
    """With no shift at all and threshold 0, the 95% lower bound passes 0 about 5% of the time."""
    rng = np.random.default_rng(2)
    mcfg = MonitorConfig(threshold_nats=0.0, confidence=0.95)
    hits = sum(
        drift_decision(rng.normal(0, 1, 200), rng.normal(0, 1, 200), mcfg).drift
        for _ in range(2000)
    )
    assert 0.03 < hits / 2000 < 0.07


def test_always_retrains_without_calling_it_drift():
    same = np.linspace(100, 200, 50)
    d = drift_decision(same, same, MonitorConfig(), always=True)
    assert d.retrain and not d.drift and "always_retrain" in d.reason
    with pytest.raises(MonitorError, match="at least 2"):
        drift_decision(np.array([1.0]), same, MonitorConfig())


def test_fashion_mnist_is_not_snapshotted_for_the_monitor(tmp_path):
    from vae_pipeline.monitor import snapshot

    cfg = load_config(make_workspace(tmp_path / "ws") / "params.yaml")
    assert snapshot(cfg, "fashion-mnist", tmp_path) is None
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
    from vae_pipeline.monitor import check_drift

    cfg = load_config(champion_ws / "params.yaml")
    report = check_drift(cfg, tracking_uri(cfg, champion_ws), champion_ws, "fashion-mnist")
    assert not report["retrain"] and report["new_images"] == 0
    assert report["reason"].startswith("fashion-mnist is a fixed dataset")
    forced = check_drift(cfg, tracking_uri(cfg, champion_ws), champion_ws, "fashion-mnist", True)
    assert forced["retrain"] and not forced["drift"]
