"""One typed, validated configuration object, built from params.yaml plus `--set` overrides.

Nothing else in the package reads params.yaml or the environment: commands build a `Config`
here once and pass it down.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from vae_pipeline.config.sections import (
    AnomalyConfig,
    DataConfig,
    EvaluateConfig,
    GenerationConfig,
    ModelConfig,
    MonitorConfig,
    OrchestrationConfig,
    ProbeConfig,
    PromotionConfig,
    RegistryConfig,
    Section,
    TrainConfig,
    floor_metrics,
)
from vae_pipeline.errors import UserError

__all__ = [
    "DEFAULT_PARAMS",
    "TRAINING_SECTIONS",
    "Config",
    "ConfigError",
    "build_config",
    "load_config",
    "parse_override",
    "save_config",
]

DEFAULT_PARAMS = Path("params.yaml")


class ConfigError(UserError):
    """A params file or override that cannot be used; the message names the field."""


TRAINING_SECTIONS = ("data", "model", "train", "evaluate", "anomaly", "probe", "generation")


class Config(Section):
    """The root configuration: one section per pipeline step."""

    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    anomaly: AnomalyConfig = Field(default_factory=AnomalyConfig)
    probe: ProbeConfig = Field(default_factory=ProbeConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    registry: RegistryConfig = Field(default_factory=RegistryConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    orchestration: OrchestrationConfig = Field(default_factory=OrchestrationConfig)
    monitor: MonitorConfig = Field(default_factory=MonitorConfig)

    @model_validator(mode="after")
    def _binarize_needs_bernoulli(self) -> Config:
        likelihood = self.model.likelihood
        for field, value in (
            ("train.binarize", self.train.binarize),
            ("evaluate.binarize", self.evaluate.binarize),
        ):
            if likelihood != "bernoulli" and value not in ("none", "auto"):
                raise ValueError(
                    f"{field}={value} applies to the Bernoulli likelihood; use {field}=none "
                    f"with model.likelihood={likelihood}"
                )
        if self.evaluate.binarize == "auto":  # resolved once, here: everything reads the value
            self.evaluate.binarize = self.train.binarize
        return self

    @model_validator(mode="after")
    def _floors_known(self) -> Config:
        known = floor_metrics(self.probe.labels_per_class)
        unknown = sorted(set(self.promotion.floors) - set(known))
        if unknown:
            raise ValueError(
                f"promotion.floors: unknown metric {unknown[0]!r} (one of {', '.join(known)})"
            )
        return self

    def params_hash(self) -> str:
        """Short, stable hash of every value: same params -> same hash (a lineage tag)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def training_hash(self) -> str:
        """Hash of what decides the trained and evaluated model (data, model, train, evaluate);
        not of how it is orchestrated, registered or promoted. Retrain caching keys on it."""
        sections = {k: getattr(self, k).model_dump(mode="json") for k in TRAINING_SECTIONS}
        blob = json.dumps(sections, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def flat(self) -> dict[str, Any]:
        """`{"train.lr": 0.001, ...}`: the form MLflow params and `--set` use."""
        return {
            f"{section}.{key}": value
            for section, values in self.model_dump(mode="json").items()
            for key, value in values.items()
        }


def _format_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"])
        got = item.get("input")
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling against params.yaml)"
        if not field or isinstance(got, dict):  # a rule across fields: its message names them
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {field}: {msg} (got {got!r})")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.key=value`; the value is read as YAML (1e-3, true, null, [1, 2])."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw = text.split("=", 1)
    keys = dotted.strip().split(".")
    if len(keys) != 2 or not all(keys):
        raise ConfigError(f"override {text!r}: the key must be section.key, e.g. train.lr=0.001")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({exc})") from exc
    return keys, value


def build_config(
    values: dict[str, Any], overrides: list[str] = (), origin: str = "params"
) -> Config:
    """Validate a params mapping plus overrides into a `Config`; errors name every bad field."""
    if not isinstance(values, dict):
        raise ConfigError(f"{origin} must be a mapping of sections (data, model, train, ...)")
    merged: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in values.items()}
    for text in overrides:
        (section, key), value = parse_override(text)
        if section not in Config.model_fields:
            allowed = ", ".join(Config.model_fields)
            raise ConfigError(f"override {text!r}: unknown section {section!r} (one of {allowed})")
        merged.setdefault(section, {})
        if not isinstance(merged[section], dict):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        merged[section][key] = value
    try:
        return Config.model_validate(merged)
    except ValidationError as err:
        where = origin + (" with overrides " + " ".join(overrides) if overrides else "")
        raise ConfigError(_format_error(err, where)) from None


def load_config(path: str | os.PathLike = DEFAULT_PARAMS, overrides: list[str] = ()) -> Config:
    """Read params.yaml (or the config a launcher wrote) and apply `--set` overrides."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"params file {path} not found: run from the project root or pass --params PATH"
        )
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"params file {path} is not valid YAML: {exc}") from exc
    return build_config(values, list(overrides), origin=str(path))


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path
