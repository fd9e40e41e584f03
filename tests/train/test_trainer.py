"""The trainer in-process (world size 1): checkpoints, exact resume, bad settings."""

import json
import math

import pytest
import torch

from vae_pipeline.config import build_config
from vae_pipeline.data.preparation import prepare
from vae_pipeline.data.sources import snapshot_source
from vae_pipeline.train import step
from vae_pipeline.train.checkpoint import load, load_model
from vae_pipeline.train.step import TrainingError, autocast_dtype
from vae_pipeline.train.trainer import Trainer

from ..conftest import tiny_params
from .trajectory import assert_same_trajectory, flat


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
        "content_box": [2, 2, 28, 28],  # Fashion-MNIST's 28x28 padded to 32: the real pixels
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
    steps = trainer.steps_per_epoch
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


class _Crash(Exception):
    pass


def _crash_at(trainer: Trainer, step: int) -> None:
    """Raise inside the forward of global training step `step` (1-based): a process dying
    mid-epoch, after the checkpoints before it were written."""
    seen = {"n": 0}

    def hook(module, args):
        if module.training:
            seen["n"] += 1
            if seen["n"] == step:
                raise _Crash(f"killed at step {step}")

    trainer.model.encoder.register_forward_pre_hook(hook)


def test_mid_epoch_checkpoint_resumes_to_exactly_the_same_weights(prepared, tmp_path):
    # 4 steps per epoch, 2 epochs, a checkpoint every 3 steps: global step 6 is epoch 2, step 2
    cfg = _cfg(epochs=2, checkpoint_every=3)
    straight = Trainer(cfg, tmp_path / "straight", workdir=prepared)
    assert straight.steps_per_epoch == 4
    straight_history = straight.fit()

    crashed = Trainer(cfg, tmp_path / "crashed", workdir=prepared)
    _crash_at(crashed, 8)
    with pytest.raises(_Crash):
        crashed.fit()
    state = load(tmp_path / "crashed" / "checkpoint.pt")  # weights_only=True
    assert state["epoch"] == 1 and state["global_step"] == 6
    assert state["position"]["step"] == 2  # mid-epoch: two steps of epoch 2 taken
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}

    torch.manual_seed(12345)  # a restarted process starts with other global RNG states
    restarted = Trainer(cfg, tmp_path / "crashed", workdir=prepared)
    history = restarted.fit()
    assert restarted.progress.global_step == straight.progress.global_step == 8
    for (name, x), y in zip(
        straight.model.state_dict().items(), restarted.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    # The resumed epoch's record carries the steps before the crash (global partial sums)
    for a, b in zip(straight_history, history, strict=True):
        for key in ("train_loss", "train_recon", "train_kl", "val_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), key
    # ... and the optimizer state went with it: the next epoch also matches
    torch.testing.assert_close(
        straight.optimizer.state_dict()["state"][0]["exp_avg_sq"],
        restarted.optimizer.state_dict()["state"][0]["exp_avg_sq"],
        rtol=0,
        atol=0,
    )


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from vae_pipeline.train.checkpoint import atomic_save
    from vae_pipeline.train.resume import rng_states, set_rng_states

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    atomic_save({"rng": rng_states()}, tmp_path / "rng.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    set_rng_states(load(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[2] == expected[2]


def _reference_gradient(cfg, trainer: Trainer, beta: float) -> dict[str, torch.Tensor]:
    """The first step's gradient in plain PyTorch, on the trainer's first batch and noise,
    with the loss written out by hand (BCE over the real 28x28 pixels, the 2-pixel padding
    left out, + beta * closed-form KL)."""
    from vae_pipeline.data.dataset import to_unit_float
    from vae_pipeline.model import ConvVAE

    torch.manual_seed(cfg.train.seed)
    model = ConvVAE(cfg.data.channels, cfg.data.image_size, cfg.model.latent_dim)
    trainer.sampler.set_epoch(0)
    idx = trainer.sampler.order()[: cfg.train.batch_size]
    x = to_unit_float(torch.from_numpy(trainer.train_set.images[idx]))
    eps = torch.randn(cfg.train.batch_size, cfg.model.latent_dim, generator=trainer._epoch_noise(0))
    mu, logvar = model.encode(x)
    logits = model.decode_logits(mu + torch.exp(0.5 * logvar) * eps)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
    kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)
    (bce[..., 2:30, 2:30].sum(dim=(1, 2, 3)) + beta * kl).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("warmup", "accum", "beta"), [(0, 1, 1.0), (10, 1, 0.0), (0, 4, 1.0), (4, 2, 0.0)]
)
def test_a_step_matches_a_plain_loop_with_kl_warmup_and_accumulation(
    prepared, tmp_path, warmup, accum, beta
):
    # one step per epoch: the whole 256-image training split in one batch
    cfg = _cfg(epochs=1, batch_size=256, kl_warmup_steps=warmup, grad_accum_steps=accum)
    trainer = Trainer(cfg, tmp_path / "one-step", workdir=prepared)
    assert trainer.steps_per_epoch == 1 and trainer.kl_weight() == beta
    history = trainer.fit()
    assert history[0]["kl_weight"] == pytest.approx(1.0 if warmup == 0 else 1 / warmup)
    expected = _reference_gradient(cfg, trainer, beta)
    for name, p in trainer.model.named_parameters():  # .grad of the step just taken
        # equal up to float summation order (accumulation adds partial gradients)
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "option", [{"channels_last": False}, {"channels_last": True}, {"compile": True}], ids=str
)
def test_a_step_with_each_layout_or_compiled_matches_a_plain_loop(prepared, tmp_path, option):
    cfg = _cfg(epochs=1, batch_size=256, **option)
    trainer = Trainer(cfg, tmp_path / "out", workdir=prepared)
    compiled = isinstance(trainer.net, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled == option.get("compile", False)
    weight = trainer.model.encoder[2].weight  # 32 input channels: the layouts differ
    assert trainer.plan.channels_last == cfg.train.channels_last
    assert weight.is_contiguous(memory_format=torch.channels_last) == cfg.train.channels_last
    trainer.fit()
    expected = _reference_gradient(cfg, trainer, 1.0)
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-5, msg=name)
    model, _ = load_model(tmp_path / "out" / "model.pt")  # the saved model loads and matches
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, trainer.model.state_dict()[name], rtol=0, atol=0)


def test_bf16_is_refused_on_a_cpu_without_bf16_units(prepared, tmp_path, monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: False)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("fp32", cpu) is None
    with pytest.raises(TrainingError, match="train.precision=bf16: this CPU"):
        autocast_dtype("bf16", cpu)
    with pytest.raises(TrainingError, match="train.precision=bf16"):
        Trainer(_cfg(precision="bf16"), tmp_path / "x", workdir=prepared)
    assert not (tmp_path / "x").exists()


def test_bf16_is_taken_on_a_cpu_with_bf16_units(monkeypatch):
    monkeypatch.setattr(step, "cpu_has_bf16", lambda: True)
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    assert autocast_dtype("auto", torch.device("cpu")) is None  # auto: the probe decides


def test_grad_accum_must_divide_the_local_batch(prepared, tmp_path):
    with pytest.raises(TrainingError, match="grad_accum_steps=3"):
        Trainer(_cfg(batch_size=64, grad_accum_steps=3), tmp_path / "x", workdir=prepared)


def test_dynamic_binarization_iwae_and_cosine_resume_bit_for_bit(prepared, tmp_path):
    # the benchmark preset's training path: a crash mid-epoch, a restart, the same weights
    cfg = _cfg(
        epochs=2,
        checkpoint_every=3,
        binarize="dynamic",
        objective="iwae",
        iw_samples=3,
        lr_schedule="cosine",
        lr_min=1e-4,
    )
    straight = Trainer(cfg, tmp_path / "straight", workdir=prepared)
    history = straight.fit()
    assert history[-1]["lr"] == pytest.approx(1e-4)  # the schedule ran to its end
    assert history[0]["train_iwae_loss"] < history[0]["train_loss"]  # IWAE bound >= ELBO
    crashed = Trainer(cfg, tmp_path / "crashed", workdir=prepared)
    _crash_at(crashed, 7)
    with pytest.raises(_Crash):
        crashed.fit()
    torch.manual_seed(999)
    restarted = Trainer(cfg, tmp_path / "crashed", workdir=prepared)
    restarted.fit()
    for (name, x), y in zip(
        straight.model.state_dict().items(), restarted.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    # and a checkpoint of another objective is not resumed by it
    with pytest.raises(TrainingError, match="other data/model/train params"):
        Trainer(_cfg(epochs=3, checkpoint_every=3), tmp_path / "crashed", workdir=prepared).fit()


def _first_inputs(trainer: Trainer) -> torch.Tensor:
    """The encoder's input at the first training step (the binarized batch), then stop."""
    seen = {}

    def hook(module, args):
        if module.training:
            seen["x"] = args[0].detach().clone()
            raise _Crash("captured")

    trainer.model.encoder.register_forward_pre_hook(hook)
    with pytest.raises(_Crash):
        trainer.fit()
    return seen["x"]


def test_dynamic_binarization_is_the_same_for_any_world_size(prepared, tmp_path):
    from vae_pipeline.train.distributed import DistEnv

    cfg = _cfg(binarize="dynamic")
    whole = _first_inputs(Trainer(cfg, tmp_path / "one", workdir=prepared))
    assert set(whole.unique().tolist()) == {0.0, 1.0}
    for rank in (0, 1):  # rank r of 2 takes rows r::2 of the global batch
        env = DistEnv(rank=rank, world_size=2)
        part = _first_inputs(Trainer(cfg, tmp_path / f"rank{rank}", env, workdir=prepared))
        torch.testing.assert_close(part, whole[rank::2], rtol=0, atol=0)


def test_iwae_with_one_sample_is_the_elbo_and_with_k_matches_a_plain_loop(prepared, tmp_path):
    from torch.distributions import Normal

    from vae_pipeline.binarize import binarize
    from vae_pipeline.data.dataset import to_unit_float
    from vae_pipeline.model import ConvVAE

    elbo = Trainer(_cfg(batch_size=256), tmp_path / "elbo", workdir=prepared)
    elbo.fit()
    one = Trainer(_cfg(batch_size=256, objective="iwae"), tmp_path / "k1", workdir=prepared)
    one.fit()  # iw_samples defaults to 1
    pairs = zip(elbo.model.state_dict().items(), one.model.state_dict().values(), strict=True)
    for (name, a), b in pairs:
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)

    k = 4
    cfg = _cfg(batch_size=256, objective="iwae", iw_samples=k, binarize="dynamic")
    trainer = Trainer(cfg, tmp_path / "k4", workdir=prepared)
    trainer.fit()  # one step: the whole split in one batch
    torch.manual_seed(cfg.train.seed)
    model = ConvVAE(1, 32, cfg.model.latent_dim)
    trainer.sampler.set_epoch(0)
    idx = torch.tensor(trainer.sampler.order()[:256])
    x = to_unit_float(torch.from_numpy(trainer.train_set.images[idx.numpy()]))
    x = binarize(x, "dynamic", cfg.train.seed, 0, idx)
    eps = torch.randn(k, 256, cfg.model.latent_dim, generator=trainer._epoch_noise(0))
    mu, logvar = model.encode(x)
    std = torch.exp(0.5 * logvar)
    log_w = []
    for j in range(k):
        z = mu + std * eps[j]
        logits = model.decode_logits(z)
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
        log_px = -bce[..., 2:30, 2:30].sum(dim=(1, 2, 3))
        log_w.append(
            log_px + Normal(0.0, 1.0).log_prob(z).sum(1) - Normal(mu, std).log_prob(z).sum(1)
        )
    (-(torch.logsumexp(torch.stack(log_w), 0) - math.log(k)).mean()).backward()
    for name, p in trainer.model.named_parameters():
        expected = dict(model.named_parameters())[name].grad
        # float summation order only (the K samples are decoded in one batch there): up to
        # 1e-3 of each gradient's scale (fp32 sums of 1,024 rows weighted by a softmax)
        scale = expected.abs().max().item()
        torch.testing.assert_close(p.grad, expected, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.mark.parametrize(
    "path", [{"resident_data": False, "num_workers": 0}, {"resident_data": False, "num_workers": 2}]
)
def test_the_loader_path_trains_exactly_like_the_resident_path(prepared, tmp_path, path):
    # the same batches in the same order (dynamic binarization keyed by their positions),
    # whether gathered on the device or read by a loader with or without worker processes
    cfg = _cfg(epochs=2, binarize="dynamic", checkpoint_every=3)
    resident = Trainer(cfg, tmp_path / "resident", workdir=prepared)
    assert resident.val_data is not None and "resident on cpu" in resident.batches.describe()
    loaded = Trainer(
        _cfg(epochs=2, binarize="dynamic", checkpoint_every=3, **path),
        tmp_path / "loader",
        workdir=prepared,
    )
    assert loaded.val_data is None and "loader" in loaded.batches.describe()
    a, b = resident.fit(), loaded.fit()
    for x, y in zip(a, b, strict=True):
        assert x["train_loss"] == y["train_loss"] and x["val_loss"] == y["val_loss"]
    for (name, x), y in zip(
        resident.model.state_dict().items(), loaded.model.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_resident_data_follows_its_budget(prepared, tmp_path):
    from vae_pipeline.train.data import resident_decision

    cpu = torch.device("cpu")
    assert _cfg().train.resident_data == "auto"
    assert resident_decision("auto", 2**20, cpu)[0]
    fits, why = resident_decision("auto", 2**60, cpu)
    assert not fits and "train.resident_data=true" in why
    assert resident_decision(True, 2**60, cpu)[0]
    assert not resident_decision(False, 1, cpu)[0]
    # each rank on a node holds its own copy: the budget is split among them
    one = resident_decision("auto", 2**30, cpu, local_world_size=1)[0]
    many = resident_decision("auto", 2**30, cpu, local_world_size=1024)[0]
    assert one and not many


def test_fused_adam_on_cpu_trains_to_the_default_adams_weights(prepared, tmp_path):
    base = {"epochs": 1, "channels_last": False, "compile": False}
    plain = Trainer(_cfg(fused_adam=False, **base), tmp_path / "plain", workdir=prepared)
    fused = Trainer(_cfg(fused_adam=True, **base), tmp_path / "fused", workdir=prepared)
    assert fused.plan.fused_adam and fused.optimizer.defaults["fused"]
    start = flat(plain.model.parameters())
    torch.testing.assert_close(flat(fused.model.parameters()), start, rtol=0, atol=0)
    plain.fit()
    fused.fit()
    # the same maths: the same trajectory up to the fused kernel's rounding
    assert_same_trajectory(
        start, flat(fused.model.parameters()), flat(plain.model.parameters()), rel=1e-2
    )
    # the control: other maths (a 10% smaller step) lands far outside that tolerance
    other = Trainer(_cfg(fused_adam=False, lr=0.9e-3, **base), tmp_path / "lr", workdir=prepared)
    other.fit()
    with pytest.raises(AssertionError, match="of the distance travelled apart"):
        assert_same_trajectory(
            start, flat(other.model.parameters()), flat(plain.model.parameters()), rel=1e-2
        )


@pytest.mark.slow
def test_lr_1e_2_trains_with_the_default_warm_up_and_blows_up_without_it(tmp_path):
    """Adam's first step moves every weight by about lr: at 1e-2 the encoder's log-variance
    overflows exp at step 2. The default warm-up (from train.lr_warmup_start) trains through a
    few hundred steps without a non-finite one; with the warm-up off the same run stops."""
    params = tiny_params(data={"limit": 3400})  # about 210 steps of 16 images
    params["train"].update(batch_size=16, nproc_per_node=1, lr=1e-2)
    cfg = build_config(params)
    snapshot_source(cfg, tmp_path)
    prepare(cfg, tmp_path)
    trainer = Trainer(cfg, tmp_path / "warm", workdir=tmp_path)
    history = trainer.fit()
    assert trainer.progress.global_step >= 200 and trainer.progress.bad_steps == 0
    assert math.isfinite(history[-1]["train_loss"]) and math.isfinite(history[-1]["val_loss"])
    assert history[-1]["train_loss"] < 400  # it learned: the first steps score about 540
    cold = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lr_warmup_steps": 0})})
    with pytest.raises(TrainingError, match="non-finite loss or gradient"):
        Trainer(cold, tmp_path / "cold", workdir=tmp_path).fit()
