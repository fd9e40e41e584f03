import pytest

from vae_pipeline.config import Config, ConfigError, build_config, load_config, parse_override

from .conftest import REPO


def test_params_yaml_loads_with_every_section():
    cfg = load_config(REPO / "params.yaml")
    assert set(Config.model_fields) == {
        "data",
        "model",
        "train",
        "evaluate",
        "registry",
        "promotion",
    }
    assert cfg.data.image_size == 32 and cfg.data.channels == 1
    assert cfg.train.nproc_per_node == 2


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
