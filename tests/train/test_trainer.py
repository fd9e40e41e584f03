"""The trainer in-process (world size 1): checkpoints, exact resume, bad settings."""

import json

import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.data import prepare, snapshot_source
from vae_pipeline.train import Trainer, TrainingError, load_model
from vae_pipeline.train.checkpoint import load

from ..conftest import tiny_params


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("prepared")
    cfg = build_config(tiny_params())
    snapshot_source(cfg, root)
    prepare(cfg, root, data_version="test-version")
    return root


def _cfg(**train):
    params = tiny_params()
    params["train"].update(train)
    return build_config(params)


def test_fit_writes_checkpoint_model_and_history(prepared):
    out = prepared / "run-a"
    history = Trainer(_cfg(epochs=2), out, workdir=prepared).fit()
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[1]["train_loss"] < history[0]["train_loss"]  # it learns
    assert json.loads((out / "history.json").read_text()) == history
    state = load(out / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 2 and state["data_version"] == "test-version"
    model, meta = load_model(out / "model.pt")
    assert meta["hparams"] == {
        "in_channels": 1,
        "image_size": 32,
        "latent_dim": 8,
        "likelihood": "bernoulli",
    }
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state["model"][name], rtol=0, atol=0)


def test_resume_from_checkpoint_gives_the_same_weights(prepared):
    straight = prepared / "straight"
    Trainer(_cfg(epochs=2), straight, workdir=prepared).fit()
    resumed = prepared / "resumed"
    Trainer(_cfg(epochs=1), resumed, workdir=prepared).fit()
    trainer = Trainer(_cfg(epochs=2), resumed, workdir=prepared)  # a restart, asked for 2 epochs
    history = trainer.fit()
    assert [h["epoch"] for h in history] == [1, 2]
    a, _ = load_model(straight / "model.pt")
    b, _ = load_model(resumed / "model.pt")
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_checkpoint_from_other_params_is_refused(prepared):
    out = prepared / "other"
    Trainer(_cfg(epochs=1), out, workdir=prepared).fit()
    with pytest.raises(TrainingError, match="other data/model/train params"):
        Trainer(_cfg(epochs=2, lr=0.01), out, workdir=prepared).fit()


def test_batch_larger_than_data_is_refused(prepared):
    with pytest.raises(TrainingError, match="train.batch_size"):
        Trainer(_cfg(batch_size=100_000), prepared / "big", workdir=prepared)


def test_non_finite_loss_stops_without_writing_a_checkpoint(prepared):
    out = prepared / "diverged"
    trainer = Trainer(_cfg(epochs=1), out, workdir=prepared)
    with torch.no_grad():
        trainer.model.fc_logvar.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss or gradient at epoch 1, step 1 "):
        trainer.fit()
    assert not (out / "checkpoint.pt").exists()


def test_gaussian_likelihood_trains_its_sigma_and_evaluates_in_nats(prepared, tmp_path):
    from vae_pipeline.evaluate import evaluate

    params = tiny_params(train={"epochs": 2}, model={"likelihood": "gaussian"})
    cfg = build_config(params)
    history = Trainer(cfg, tmp_path / "g", workdir=prepared).fit()
    assert history[1]["train_loss"] < history[0]["train_loss"]
    model, meta = load_model(tmp_path / "g" / "model.pt")
    assert meta["hparams"]["likelihood"] == "gaussian"
    # [0, 1] pixels and a decoder that fits them: the learned sigma shrinks below 1.
    assert model.log_sigma.item() < 0.0
    cfg = cfg.model_copy(
        update={"evaluate": cfg.evaluate.model_copy(update={"reports_dir": str(tmp_path / "r")})}
    )
    metrics = evaluate(cfg, model, prepared)
    assert metrics["likelihood"] == "gaussian"
    assert metrics["elbo"] == pytest.approx(-(metrics["recon"] + metrics["kl"]), rel=1e-6)
    assert metrics["iw_nll"] <= -metrics["elbo"] + 3 * metrics["iw_nll_stderr"]


def _poison(trainer, *steps):
    """Fault injection: the encoder's input becomes NaN at these global training steps (1-based),
    as a corrupt batch or an overflow would make it; everything after is the real trainer."""
    seen = {"n": 0}

    def hook(module, args):
        if not module.training:
            return None
        seen["n"] += 1
        return (args[0] * float("nan"),) if seen["n"] in steps else None

    trainer.model.encoder.register_forward_pre_hook(hook)


def test_non_finite_step_stops_naming_step_and_batch_and_keeps_the_checkpoint(prepared, tmp_path):
    cfg = _cfg(epochs=3)
    trainer = Trainer(cfg, tmp_path / "nan", workdir=prepared)
    steps = len(trainer.loader)
    _poison(trainer, steps + 2)  # epoch 2, step 2
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    trainer.sampler.set_epoch(1)
    batch = list(trainer.sampler)[cfg.train.batch_size : 2 * cfg.train.batch_size]
    assert "non-finite loss or gradient at epoch 2, step 2 " in message
    assert f"[{', '.join(map(str, batch[:8]))}, ...]" in message
    assert "the last is epoch 1" in message and "train.max_bad_steps" in message
    state = load(tmp_path / "nan" / "checkpoint.pt")
    assert state["epoch"] == 1  # the epoch-2 weights (NaN) were never written
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert not (tmp_path / "nan" / "model.pt").exists()


def test_skip_mode_skips_up_to_max_bad_steps(prepared, tmp_path):
    trainer = Trainer(_cfg(epochs=2, max_bad_steps=1), tmp_path / "skip", workdir=prepared)
    _poison(trainer, 2)
    history = trainer.fit()
    assert [h["skipped_steps"] for h in history] == [1, 0]
    model, _ = load_model(tmp_path / "skip" / "model.pt")
    assert all(torch.isfinite(p).all() for p in model.parameters())

    again = Trainer(_cfg(epochs=2, max_bad_steps=1), tmp_path / "skip2", workdir=prepared)
    _poison(again, 1, 3)
    with pytest.raises(TrainingError, match=r"more than train.max_bad_steps=1 non-finite steps"):
        again.fit()
    assert not (tmp_path / "skip2" / "checkpoint.pt").exists()


def test_non_finite_weights_are_never_saved_or_registered(tmp_path):
    from vae_pipeline.model import ConvVAE
    from vae_pipeline.pipeline import check_registrable
    from vae_pipeline.train.checkpoint import save_model

    model = ConvVAE(1, 16, 2)
    save_model(model, tmp_path / "model.pt")
    before = (tmp_path / "model.pt").read_bytes()
    with torch.no_grad():
        model.fc_mu.weight[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite values in fc_mu.weight"):
        save_model(model, tmp_path / "model.pt")
    assert (tmp_path / "model.pt").read_bytes() == before  # the previous file is untouched
    blob = {"state_dict": model.state_dict()}
    metrics = {"elbo": -1.0, "recon": 1.0, "kl": 0.0, "iw_nll": 1.0}
    with pytest.raises(ValueError, match="not registering .*fc_mu.weight"):
        check_registrable(blob, metrics, tmp_path / "model.pt")
    good = {"state_dict": ConvVAE(1, 16, 2).state_dict()}
    with pytest.raises(ValueError, match="not registering .*iw_nll"):
        check_registrable(good, {**metrics, "iw_nll": float("nan")}, tmp_path / "model.pt")
    check_registrable(good, metrics, tmp_path / "model.pt")  # finite: no error
