"""Per-epoch checkpoints as MLflow 3 logged models (registry.log_checkpoints), on the real
SQLite store: one per epoch, its metrics linked, loadable as the pyfunc, the run untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.tracking import CheckpointModels, EpochLogger, client_for, start_run
from vae_pipeline.train.trainer import Trainer

from .conftest import tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracking")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, root)
    prepare(cfg, root, data_version="test-version")
    return root


def test_each_epoch_is_a_logged_model_with_its_metrics(prepared, tmp_path):
    import mlflow.pyfunc

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config(tiny_params(train={"epochs": 2}, registry={"tracking_uri": uri}))
    run_id = start_run(cfg, uri, tmp_path, "checkpoints", {"git_commit": "unknown"})
    callbacks = (EpochLogger(uri, run_id), CheckpointModels(uri, run_id))
    trainer = Trainer(cfg, tmp_path / "run", workdir=prepared, callbacks=callbacks)
    history = trainer.fit()

    client = client_for(uri)
    run = client.get_run(run_id)
    assert run.info.status == "RUNNING"  # logging a checkpoint does not end the flow's run
    outputs = sorted(run.outputs.model_outputs, key=lambda o: o.step)
    assert [o.step for o in outputs] == [1, 2]
    for output, record in zip(outputs, history, strict=True):
        model = client.get_logged_model(output.model_id)
        assert model.name == "checkpoint" and model.source_run_id == run_id
        linked = {m.key: m for m in model.metrics}
        assert linked["val_loss"].step == record["epoch"]
        assert linked["val_loss"].value == pytest.approx(record["val_loss"])
    # the last checkpoint is the trained model: the pyfunc gives its latent means
    x = np.random.default_rng(0).random((3, 1, 32, 32)).astype(np.float32)
    loaded = mlflow.pyfunc.load_model(f"models:/{outputs[-1].model_id}")
    with torch.no_grad():
        mu, _ = trainer.model.cpu().eval().encode(torch.from_numpy(x))
    np.testing.assert_allclose(loaded.predict(x), mu.numpy(), rtol=1e-5, atol=1e-6)


def test_a_model_uri_the_registry_lacks_is_named_as_missing(tmp_path):
    """No champion promoted yet, an unknown model or version: a clear error, no traceback."""
    from mlflow.tracking import MlflowClient

    from vae_pipeline.errors import UserError
    from vae_pipeline.tracking import download_weights

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri, registry_uri=uri).create_registered_model("conv-vae")
    for model_uri, says in (
        ("models:/conv-vae@champion", "alias champion not found"),
        ("models:/conv-vae/3", "not found"),
        ("models:/no-such-model/1", "not found"),
    ):
        with pytest.raises(UserError) as caught:
            download_weights(uri, model_uri, tmp_path / "dl")
        message = str(caught.value)
        assert message.startswith(f"{model_uri} is not in the registry at sqlite:///"), message
        assert says in message.lower() and "vae-pipeline history" in message
