"""`vae-pipeline score | encode | sample | interpolate` on the short real training without the
class Bag, from its train folder and from the registered version (threshold and pyfunc)."""

import json

import mlflow.pyfunc
import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from vae_pipeline import cli
from vae_pipeline.data.dataset import PreparedSplit, to_unit_float
from vae_pipeline.evaluate import anomaly
from vae_pipeline.evaluate.estimator import encode_means

from .conftest import fashion_mnist_pngs


def _cli(ws, *args) -> int:
    return cli.main([args[0], "--params", str(ws / "bagless.yaml"), *args[1:]])


def test_score_of_a_registered_version_uses_its_stored_threshold(bagless, registered, monkeypatch):
    ws, cfg, model, metrics = bagless
    monkeypatch.chdir(ws)
    assert _cli(ws, "score", "--model", registered, "--split", "test", "--out", "s.parquet") == 0
    table = pq.read_table(ws / "s.parquet")
    assert table.column_names == [
        "image",
        "label",
        "neg_elbo_nats",
        "iw_nll_nats",
        "complexity_nats",
        "floor_nats",
        "is_anomaly",
    ]
    iw = np.asarray(table["iw_nll_nats"])
    # The same numbers as the evaluation's per-example values (same K, seed and rows).
    np.testing.assert_allclose(iw, np.load(ws / "reports" / "per_example_iw_nll.npy"), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(table["neg_elbo_nats"]),
        np.load(ws / "reports" / "per_example_elbo_nll.npy"),
        rtol=1e-6,
    )
    flags = np.asarray(table["is_anomaly"])
    images = PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor()
    length, floor = anomaly.complexity(to_unit_float(images), "bernoulli", model.content_box)
    np.testing.assert_allclose(np.asarray(table["complexity_nats"]), length, rtol=1e-12)
    np.testing.assert_allclose(np.asarray(table["floor_nats"]), floor, rtol=1e-12)
    terms = {"iw_log_px": -iw, "complexity": length, "floor": floor}
    scores = anomaly.anomaly_scores(terms, "typicality", metrics["anomaly_reference"])
    assert np.array_equal(flags, scores > metrics["anomaly_threshold"])
    is_bag = np.asarray(table["label"]) == "Bag"
    assert flags[is_bag].mean() > 3 * flags[~is_bag].mean()
    meta = json.loads(table.schema.metadata[b"vae_pipeline"])
    assert meta["threshold"]["threshold"] == metrics["anomaly_threshold"]
    assert meta["threshold"]["score"] == "typicality" and meta["iw_k"] == cfg.evaluate.iw_samples
    # Source paths from the prepared index, not row numbers.
    assert np.asarray(table["image"])[0] == "t10k[0]"


def test_the_pyfunc_flags_anomalies_by_the_stored_threshold(bagless, registered):
    ws, cfg, _, metrics = bagless
    model = mlflow.pyfunc.load_model(registered)
    test = PreparedSplit(ws / cfg.data.prepared_dir, "test")
    x = to_unit_float(test.tensor(0, 300)).numpy()
    flags = model.predict(x, params={"output": "is_anomaly"})
    k = cfg.evaluate.iw_samples
    iw = model.predict(x, params={"output": "iw_score", "k": k}).astype(np.float64)
    length, floor = anomaly.complexity(x, "bernoulli", bagless[2].content_box)
    terms = {"iw_log_px": -iw, "complexity": length, "floor": floor}
    scores = anomaly.anomaly_scores(terms, "typicality", metrics["anomaly_reference"])
    assert np.array_equal(flags, (scores > metrics["anomaly_threshold"]).astype(np.int64))
    assert flags.any() and not flags.all()
    logvar = model.predict(x, params={"output": "latent_logvar"})
    assert logvar.shape == (300, cfg.model.latent_dim) and (logvar < 1).all()


def test_the_pyfunc_scores_an_image_the_same_alone_or_anywhere_in_a_batch(bagless, registered):
    ws, cfg, _, _ = bagless
    model = mlflow.pyfunc.load_model(registered)
    x = to_unit_float(PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor(0, 8)).numpy()
    for params in ({"output": "score"}, {"output": "iw_score", "k": 8}):
        batch = model.predict(x, params=params)
        alone = np.array([model.predict(x[i : i + 1], params=params)[0] for i in range(8)])
        turned = model.predict(np.ascontiguousarray(x[::-1]), params=params)[::-1]
        np.testing.assert_allclose(alone, batch, rtol=1e-5)
        np.testing.assert_allclose(turned, batch, rtol=1e-5)
        assert len(set(batch.round(3))) == 8  # the rows' own draws, not one shared stream
    flags = model.predict(x, params={"output": "is_anomaly"})
    assert [
        model.predict(x[i : i + 1], params={"output": "is_anomaly"})[0] for i in range(8)
    ] == list(flags)


def test_the_pyfunc_metadata_tells_each_outputs_dtype_and_shape(bagless, registered):
    ws, cfg, _, _ = bagless
    info = mlflow.models.get_model_info(registered)
    assert info.signature.outputs is None  # no single tensor spec could tell them all
    assert [s.type for s in info.signature.inputs.inputs] == [np.dtype(np.float32)]
    outputs = info.metadata["outputs"]
    model = mlflow.pyfunc.load_model(registered)
    x = to_unit_float(PreparedSplit(ws / cfg.data.prepared_dir, "test").tensor(0, 4)).numpy()
    sizes = {"N": 4, "latent_dim": cfg.model.latent_dim, "C*H*W": x[0].size}
    assert set(outputs) == {
        "latent_mean",
        "latent_logvar",
        "score",
        "iw_score",
        "is_anomaly",
        "reconstruction",
    }
    for output, spec in outputs.items():
        y = model.predict(x, params={"output": output})
        assert str(y.dtype) == spec["dtype"], output
        assert list(y.shape) == [sizes[d] for d in spec["shape"]], output


def test_score_from_a_folder_with_a_threshold_given_as_csv(bagless, tmp_path, monkeypatch, capsys):
    ws, _, _, _ = bagless
    monkeypatch.chdir(ws)
    folder = fashion_mnist_pngs(tmp_path / "new", 0, 30)
    out = tmp_path / "scores.csv"
    args = ["--images", str(folder), "--out", str(out), "--threshold", "300"]
    # a threshold in nats is for a likelihood score; typicality's needs its stored reference
    assert _cli(ws, "score", "--model", "models", *args) == 1
    assert "needs the validation reference" in capsys.readouterr().err
    args += ["--set", "anomaly.score=iw_nll"]
    assert _cli(ws, "score", "--model", "models", *args) == 0
    lines = out.read_text().splitlines()
    header = "image,label,neg_elbo_nats,iw_nll_nats,complexity_nats,floor_nats,is_anomaly"
    assert lines[0] == header and len(lines) == 31
    rows = [line.split(",") for line in lines[1:]]
    assert all(r[0].startswith(f"{r[1]}/img") for r in rows)  # sub-folder = label
    assert all((float(r[3]) > 300) == (r[6] == "True") for r in rows)
    assert json.loads((tmp_path / "scores.csv.json").read_text())["threshold"]["threshold"] == 300


def test_score_without_a_threshold_has_no_flags_and_refuses_other_suffixes(
    bagless, tmp_path, monkeypatch, capsys
):
    ws, _, _, _ = bagless
    monkeypatch.chdir(ws)
    assert (
        _cli(ws, "score", "--model", "models", "--split", "val", "--out", str(tmp_path / "v.csv"))
        == 0
    )
    assert "is_anomaly" not in (tmp_path / "v.csv").read_text().splitlines()[0]
    assert _cli(ws, "score", "--model", "models", "--split", "val", "--out", "x.xlsx") == 1
    assert "--out x.xlsx: the suffix must be .csv or .parquet" in capsys.readouterr().err


def test_encode_writes_means_log_variances_sources_and_a_pca_plot(bagless, tmp_path, monkeypatch):
    ws, cfg, model, _ = bagless
    monkeypatch.chdir(ws)
    out, plot = tmp_path / "z.parquet", tmp_path / "z.png"
    args = ["--model", "models", "--split", "test", "--out", str(out), "--plot", str(plot)]
    assert _cli(ws, "encode", *args) == 0
    table = pq.read_table(out)
    d = cfg.model.latent_dim
    names = ["image", "label"] + [f"mu_{j}" for j in range(d)] + [f"logvar_{j}" for j in range(d)]
    assert table.column_names == names
    test = PreparedSplit(ws / cfg.data.prepared_dir, "test")
    assert table.num_rows == len(test)
    mu, logvar = encode_means(model, test.tensor(), torch.device("cpu"))
    np.testing.assert_allclose(np.asarray(table["mu_3"]), mu[:, 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(table[f"logvar_{d - 1}"]), logvar[:, d - 1], rtol=1e-6)
    names = test.manifest["label_names"]
    assert np.asarray(table["label"]).tolist() == [names[k] for k in test.labels]
    meta = json.loads(table.schema.metadata[b"vae_pipeline"])
    assert meta["data_version"] == test.manifest["data_version"] and meta["latent_dim"] == d
    assert Image.open(plot).size[0] >= 500


def _tiles(path, side=32, pad=2) -> list[np.ndarray]:
    grid = np.asarray(Image.open(path).convert("L"))
    cols = (grid.shape[1] - pad) // (side + pad)
    rows = (grid.shape[0] - pad) // (side + pad)
    return [
        grid[
            pad + r * (side + pad) : pad + r * (side + pad) + side,
            pad + c * (side + pad) : pad + c * (side + pad) + side,
        ]
        for r in range(rows)
        for c in range(cols)
    ]


def test_sample_takes_n_seed_and_temperature(bagless, tmp_path, monkeypatch, capsys):
    ws, _, _, _ = bagless
    monkeypatch.chdir(ws)
    hot, cold, again = tmp_path / "hot.png", tmp_path / "cold.png", tmp_path / "again.png"
    assert _cli(ws, "sample", "--model", "models", "--n", "16", "--out", str(hot)) == 0
    assert _cli(ws, "sample", "--model", "models", "--n", "16", "--out", str(again)) == 0
    args = ["--model", "models", "--n", "16", "--temperature", "1e-6", "--out", str(cold)]
    assert _cli(ws, "sample", *args) == 0
    assert Image.open(hot).size == (4 * 34 + 2, 4 * 34 + 2)
    assert np.array_equal(np.asarray(Image.open(hot)), np.asarray(Image.open(again)))  # seeded
    hot_tiles, cold_tiles = _tiles(hot), _tiles(cold)
    assert len(hot_tiles) == 16
    assert all(np.array_equal(t, cold_tiles[0]) for t in cold_tiles)  # z ~ 0: one image
    assert not all(np.array_equal(t, hot_tiles[0]) for t in hot_tiles)
    assert _cli(ws, "sample", "--model", "models", "--temperature", "0", "--out", str(cold)) == 1
    assert "--temperature > 0" in capsys.readouterr().err


def test_interpolate_two_test_images(bagless, tmp_path, monkeypatch, capsys):
    ws, cfg, _, _ = bagless
    monkeypatch.chdir(ws)
    out = tmp_path / "line.png"
    assert (
        _cli(
            ws,
            "interpolate",
            "--model",
            "models",
            "test:0",
            "test:1",
            "--steps",
            "6",
            "--out",
            str(out),
        )
        == 0
    )
    tiles = _tiles(out)
    assert len(tiles) == 8  # A, 6 decoded points, B
    test = PreparedSplit(ws / cfg.data.prepared_dir, "test")
    assert np.array_equal(tiles[0], test.tensor(0, 1)[0, 0].numpy())
    assert np.array_equal(tiles[-1], test.tensor(1, 2)[0, 0].numpy())
    assert not np.array_equal(tiles[1], tiles[6])  # the line moves
    assert (
        _cli(ws, "interpolate", "--model", "models", "test:0", "test:99999", "--out", str(out)) == 1
    )
    assert "the test split has" in capsys.readouterr().err
