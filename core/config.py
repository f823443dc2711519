"""The run configuration: what `qcore quantize` does, loadable from YAML or JSON and echoed
into every saved model and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from qcore.errors import ConfigError, validation_summary
from qcore.interfaces import DataSpec
from qcore.io import parse_size
from qcore.schemes import QuantScheme, get_scheme


def flag(group: str, help: str, *, name: str | None = None, metavar: str | None = None,
         shown_default: str | None = None) -> dict[str, Any]:
    """What the command line makes of a config field (``json_schema_extra``): the help
    group it is listed in, its help, and optionally its flag name (default: the field's
    name with dashes), metavar and the default its help shows."""
    return {"cli": {"group": group, "help": help, "name": name, "metavar": metavar,
                    "shown_default": shown_default}}


#: the scheme of a run that names none, for a method that declares no default_scheme
DEFAULT_SCHEME = "W4A16"
DATA, METHOD, OUTPUT, ADVANCED = "model and data", "method", "output", "advanced"


class CalibrationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataSpec = Field(default=DataSpec(source="pydoc"), json_schema_extra=flag(
        DATA, "calibration text: a .txt/.jsonl file, 'pydoc', or hf:NAME:SPLIT",
        name="calib", metavar="SOURCE", shown_default="pydoc"))
    samples: int = Field(default=128, gt=0, json_schema_extra=flag(
        DATA, "calibration windows", metavar="N"))
    seq_len: int = Field(default=512, gt=1, json_schema_extra=flag(
        DATA, "tokens per calibration window", metavar="L"))
    sampling: Literal["consecutive", "random"] = Field(
        default="consecutive", json_schema_extra=flag(
            DATA, "windows from the start of the text, or at seeded random offsets"))
    seed: int = Field(default=0, json_schema_extra=flag(DATA, "seed of `sampling` random"))
    batch_size: int = Field(default=4, gt=0, json_schema_extra=flag(
        ADVANCED, "calibration windows per forward", metavar="N"))


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(json_schema_extra=flag(
        DATA, "HF folder, .gguf file, hub id (online only), or 'smollm2' (the embedded "
              "SmolLM2-135M-Instruct)"))
    method: str = Field(default="rtn", json_schema_extra=flag(
        METHOD, "quantizer name, see `qcore list-plugins`"))
    scheme: str | QuantScheme | None = Field(default=None, json_schema_extra=flag(
        METHOD, "a preset (`qcore schemes`) or a scheme mapping in --config",
        shown_default="the method's"))
    group_size: int | None = Field(default=None, gt=0, json_schema_extra=flag(
        METHOD, "weight group size; a value given must divide every quantized layer's input "
                "features, the preset's falls back (with a notice) to the largest power of two "
                "that does (64 for SmolLM2's 576)", metavar="N", shown_default="the preset's"))
    observer: Literal["minmax", "mse"] | None = Field(default=None, json_schema_extra=flag(
        METHOD, "how each weight row/group range is chosen: min/max, or the MSE clip "
                "search", shown_default="the scheme's, minmax"))
    method_config: dict[str, Any] = Field(default_factory=dict, json_schema_extra=flag(
        METHOD, "a field of the method's config, value in YAML (repeatable)", name="set",
        metavar="KEY=VALUE", shown_default="none"))
    calibration: CalibrationConfig = CalibrationConfig()
    backend: str = Field(default="cpu", json_schema_extra=flag(
        ADVANCED, "where layers run: a backend plugin (cpu, npu)"))
    propagation: Literal["quantized", "full"] | None = Field(default=None, json_schema_extra=flag(
        METHOD, "next layer's inputs: the quantized or the float layer's outputs",
        shown_default="the method's"))
    error_windows: int | None = Field(default=4, ge=0, json_schema_extra=flag(
        ADVANCED, "calibration windows each layer's relative MSE is measured on (null: "
                  "all; 0: none, and a method that needs no calibration runs no forward at "
                  "all)", metavar="N"))
    save: str | None = Field(default=None, json_schema_extra=flag(
        OUTPUT, "output folder, written atomically; must not exist or be empty unless "
                "`overwrite`", metavar="DIR", shown_default="not saved"))
    overwrite: bool = Field(default=False, json_schema_extra=flag(
        OUTPUT, "replace an existing saved model at `save` (never a folder holding other "
                "files, an input or the current directory)"))
    format: str = Field(default="qcore", json_schema_extra=flag(OUTPUT, "save format plugin"))
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", json_schema_extra=flag(ADVANCED, "dtype of the float model in memory; "
        "methods compute Hessians, searches and training in float32 per layer; auto: the "
        "checkpoint's (float32 for GGUF and undeclared)"))
    stream: bool = Field(default=True, json_schema_extra=flag(
        ADVANCED, "load the whole float model first and save it whole at the end (default: "
                  "a safetensors folder is read, and the output written, one decoder layer "
                  "at a time)", name="no-stream"))
    resume: bool = Field(default=False, json_schema_extra=flag(
        OUTPUT, "continue an interrupted run of the same configuration from the layers "
                "already written to `save`"))
    max_shard_size: str | None = Field(default=None, json_schema_extra=flag(
        OUTPUT, "largest safetensors shard of the output, e.g. 500MB, 2GB", metavar="SIZE",
        shown_default="the format's"))
    activation_budget: str | None = Field(default=None, json_schema_extra=flag(
        ADVANCED, "memory the calibration activations may use, e.g. 4GB; beyond it they "
                  "go to disk and are read back a batch at a time", metavar="SIZE",
        shown_default="half the memory available at the start"))
    offload_dir: str | None = Field(default=None, json_schema_extra=flag(
        ADVANCED, "folder for offloaded activations", metavar="DIR",
        shown_default="the system's temporary folder"))

    #: fields that change neither the quantized tensors nor where they go
    NOT_IDENTITY: ClassVar[tuple[str, ...]] = (
        "save", "overwrite", "resume", "stream", "max_shard_size", "error_windows",
        "activation_budget", "offload_dir")

    @field_validator("max_shard_size", "activation_budget")
    @classmethod
    def _a_size(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None:
            parse_size(value, f"`{info.field_name}`")  # e.g. "500MB"; refused before any work
        return value

    def activation_budget_bytes(self) -> int | None:
        return None if self.activation_budget is None else parse_size(
            self.activation_budget, "`activation_budget`")

    def resolved_scheme(self) -> QuantScheme:
        """The scheme with the group size and observer overrides (no scheme named: the
        global default; ``qcore.api.quantize`` names the method's own first)."""
        if isinstance(self.scheme, QuantScheme):
            return self.scheme.with_group_size(self.group_size).with_observer(self.observer)
        name = DEFAULT_SCHEME if self.scheme is None else self.scheme
        return get_scheme(name, self.group_size).with_observer(self.observer)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        """Load YAML or JSON; a missing file, a syntax error (with its line) or a bad field
        is a one-line :class:`ConfigError`."""
        data = load_mapping(path)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(f"{path}: {validation_summary(exc)}") from exc


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
                              f"({_yaml_problem(exc)}); quote it, e.g. {key}='[a, b]'") from exc
    return out
