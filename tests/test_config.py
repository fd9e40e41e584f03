import pytest
import yaml

from vae_pipeline.config import Config, ConfigError, build_config, load_config, parse_override

from .conftest import REPO


def test_params_yaml_loads_with_every_section():
    cfg = load_config(REPO / "params.yaml")
    assert set(Config.model_fields) == {
        "data",
        "model",
        "train",
        "evaluate",
        "anomaly",
        "probe",
        "generation",
        "registry",
        "promotion",
        "orchestration",
        "monitor",
    }
    assert cfg.data.image_size == 32 and cfg.data.channels == 1
    assert cfg.train.nproc_per_node == "auto"
    # Every key in params.yaml is spelled out (nothing left to a default silently).
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    for section in ("anomaly", "probe", "generation"):
        assert set(raw[section]) == set(getattr(cfg, section).model_fields), section


def test_overrides_are_typed_from_yaml():
    cfg = build_config({}, ["train.lr=3e-4", "data.limit=null", "promotion.enabled=false"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.data.limit is None
    assert cfg.promotion.enabled is False


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ("train.lr=-1", "train.lr", "greater than 0"),
        ("data.channels=2", "data.channels", "1 or 3"),
        ("data.on_bad_image=ignore", "data.on_bad_image", "'skip' or 'fail'"),
        ("train.epochs=many", "train.epochs", "integer"),
        ("train.lrr=0.1", "train.lrr", "unknown field"),
        ("data.s3_url=http://x", "data.s3_url", "s3://"),
    ],
)
def test_bad_values_name_the_field_and_allowed_values(override, field, hint):
    with pytest.raises(ConfigError) as err:
        build_config({}, [override])
    assert field in str(err.value)
    assert hint in str(err.value)


@pytest.mark.parametrize("text", ["train.lr", "lr=1", "a.b.c=1"])
def test_malformed_override(text):
    with pytest.raises(ConfigError, match="override"):
        parse_override(text)


def test_unknown_section():
    with pytest.raises(ConfigError, match="unknown section 'trian'"):
        build_config({}, ["trian.lr=1"])


def test_missing_params_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="--params"):
        load_config(tmp_path / "nope.yaml")


def test_params_hash_tracks_values():
    a = build_config({})
    assert a.params_hash() == build_config({}).params_hash()
    assert a.params_hash() != build_config({}, ["train.lr=0.5"]).params_hash()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.nnodes=2"], "train.nnodes=2 needs train.rdzv_endpoint=host:port"),
        (["train.rdzv_endpoint=10.0.0.1"], "train.rdzv_endpoint: Value error, must be host:port"),
        (["train.rdzv_endpoint=host:99999"], "must be host:port"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps"),
        (["train.precision=fp16"], "train.precision"),
    ],
)
def test_topology_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "params.yaml", overrides)
    assert message in str(err.value)


def test_torchrun_flags_follow_the_train_section():
    from vae_pipeline.train.launch import rendezvous_args, torchrun_command

    one = load_config(REPO / "params.yaml").train
    assert rendezvous_args(one) == ["--standalone", "--nnodes=1", "--max-restarts=0"]
    many = load_config(
        REPO / "params.yaml",
        ["train.nnodes=4", "train.rdzv_endpoint=10.0.0.1:29400", "train.max_restarts=3"],
    ).train
    cmd = torchrun_command("c.yaml", 8, ["--out-dir", "m"], topology=rendezvous_args(many))
    assert cmd[1:] == [
        "-m", "torch.distributed.run", "--nnodes=4", "--rdzv-backend=c10d",
        "--rdzv-endpoint=10.0.0.1:29400", "--rdzv-id=vae-pipeline", "--max-restarts=3",
        "--nproc-per-node=8", "-m", "vae_pipeline.worker", "--params", "c.yaml", "--out-dir", "m",
    ]  # fmt: skip


def test_train_flags_are_overrides_that_win_over_set(capsys):
    from vae_pipeline.cli.parser import build_parser, topology_overrides

    args = build_parser().parse_args(
        [
            "train",
            "--set",
            "train.nnodes=3",
            "--nnodes",
            "2",
            "--rdzv-endpoint",
            "h:1",
            "--max-restarts",
            "1",
        ]
    )
    assert topology_overrides(args) == [
        "train.nnodes=2", "train.rdzv_endpoint=h:1", "train.max_restarts=1"
    ]  # fmt: skip
    cfg = load_config(REPO / "params.yaml", [*args.overrides, *topology_overrides(args)])
    assert (cfg.train.nnodes, cfg.train.rdzv_endpoint, cfg.train.max_restarts) == (2, "h:1", 1)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--nnodes", "--nproc-per-node", "--rdzv-endpoint", "--rdzv-id", "--max-restarts"):
        assert flag in help_text


def test_evaluation_binarizes_as_training_did_unless_told_otherwise():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert params["evaluate"]["binarize"] == "auto"
    cfg = build_config(params, ["train.binarize=dynamic"])
    assert cfg.evaluate.binarize == "dynamic"  # auto resolved once, where the config is built
    cfg = build_config(params, ["train.binarize=dynamic", "evaluate.binarize=none"])
    assert cfg.evaluate.binarize == "none"
    assert build_config(params).evaluate.binarize == "none"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["model.likelihood=gaussian", "train.binarize=dynamic"],
            "train.binarize=dynamic applies to the Bernoulli likelihood",
        ),
        (
            ["model.likelihood=discretized_logistic", "evaluate.binarize=fixed"],
            "evaluate.binarize=fixed applies to the Bernoulli likelihood",
        ),
        (["data.source='idx:'"], "idx: needs a folder"),
        (["train.objective=vimco"], "train.objective"),
        (["train.channels_last=sometimes"], "train.channels_last"),
        (["train.num_workers=-1"], "train.num_workers"),
        (["train.compile=fast"], "train.compile"),
    ],
)
def test_new_training_settings_are_checked(overrides, message):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        build_config(params, overrides)


def test_the_benchmark_preset_loads():
    cfg = load_config(REPO / "params" / "binarized-benchmark.yaml")
    assert cfg.train.binarize == cfg.evaluate.binarize == "dynamic"
    assert cfg.train.objective == "iwae" and cfg.evaluate.iw_samples == 5000
    assert cfg.data.source.startswith("idx:")
    assert cfg.registry.model_name != build_config({}).registry.model_name
