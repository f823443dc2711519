"""The run configuration: what `qcore quantize` does, loadable from YAML or JSON and echoed
into every saved model and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qcore.errors import ConfigError
from qcore.interfaces import DataSpec
from qcore.io import parse_size
from qcore.schemes import QuantScheme, get_scheme


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataSpec = DataSpec(source="pydoc")
    samples: int = Field(default=128, gt=0)
    seq_len: int = Field(default=512, gt=1)
    sampling: Literal["consecutive", "random"] = "consecutive"
    seed: int = 0
    batch_size: int = Field(default=4, gt=0)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="HF folder, hub id, .gguf file, or the alias 'smollm2'")
    method: str = "rtn"
    scheme: str | QuantScheme = "W4A16"
    group_size: int | None = Field(default=None, gt=0, description="overrides the preset's")
    observer: Literal["minmax", "mse"] | None = Field(
        default=None, description="weight range observer; overrides the scheme's (minmax)")
    method_config: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig = CalibrationConfig()
    backend: str = "cpu"
    propagation: Literal["quantized", "full"] | None = None
    error_windows: int | None = Field(
        default=4, ge=0, description="calibration windows each layer's relative MSE is "
                                     "measured on (null: all; 0: not measured, and a method "
                                     "that needs no calibration runs no forward at all)")
    save: str | None = None
    overwrite: bool = Field(default=False, description="replace an existing saved model at "
                                                       "`save` (never other folders)")
    format: str = "qcore"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="dtype of the float model in memory; auto: the "
                                    "checkpoint's (float32 for GGUF and undeclared)")
    stream: bool = Field(default=True, description="load a safetensors folder one decoder "
                                                   "layer at a time, and write the output "
                                                   "layer by layer when the format can")
    resume: bool = Field(default=False, description="continue an interrupted layer-by-layer "
                                                    "save of the same run at `save`")
    max_shard_size: str | None = Field(
        default=None, description="largest safetensors shard of the output (the format's "
                                  "default when null)")

    activation_budget: str | None = Field(
        default=None, description="memory the calibration activations may use, e.g. 4GB; "
                                  "beyond it they are offloaded to disk (null: half the "
                                  "memory available at the start)")
    offload_dir: str | None = Field(
        default=None, description="folder for offloaded activations (null: the system's "
                                  "temporary folder)")

    #: fields that change neither the quantized tensors nor where they go
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = ("save", "overwrite", "resume", "stream",
                                               "max_shard_size", "error_windows",
                                               "activation_budget", "offload_dir")

    @field_validator("max_shard_size")
    @classmethod
    def _a_size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)  # e.g. "500MB"; refused before any work
        return value

    @field_validator("activation_budget")
    @classmethod
    def _a_budget(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value, "--activation-budget")
        return value

    def activation_budget_bytes(self) -> int | None:
        return None if self.activation_budget is None else parse_size(
            self.activation_budget, "--activation-budget")

    def resolved_scheme(self) -> QuantScheme:
        if isinstance(self.scheme, QuantScheme):
            scheme = self.scheme.with_group_size(self.group_size)
        else:
            scheme = get_scheme(self.scheme, self.group_size)
        return scheme.with_observer(self.observer)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Load YAML or JSON; a missing file, a syntax error (with its line) or a bad field
        is a one-line :class:`ConfigError`."""
        data = load_mapping(path)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {validation_summary(exc)}") from exc


def validation_summary(exc: ValidationError) -> str:
    """A pydantic error as one line: ``field.path: message (got value)`` for each problem."""
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or '(top level)'}: "
        + ("unknown field" if e["type"] == "extra_forbidden" else e["msg"])
        + (f" (got {e['input']!r})" if "input" in e and e["type"] != "extra_forbidden"
           and not isinstance(e["input"], dict) else "")
        for e in exc.errors())


def load_mapping(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON file holding one mapping."""
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    text = file.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if file.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of fields, got {type(data).__name__}")
    return data


def _yaml_problem(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1} column {mark.column + 1}" if mark else problem


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings into a dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r} has an empty key")
        try:
            out[key] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML "
                              f"({_yaml_problem(exc)}); quote it, e.g. {key}='[a, b]'"
                              ) from exc
    return out
