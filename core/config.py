"""The run configuration: what `qcore quantize` does, loadable from YAML or JSON and echoed
into every saved model and report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from qcore.interfaces import DataSpec
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
    method_config: dict[str, Any] = Field(default_factory=dict)
    calibration: CalibrationConfig = CalibrationConfig()
    backend: str = "cpu"
    propagation: Literal["quantized", "full"] | None = None
    error_windows: int | None = Field(
        default=4, gt=0, description="calibration windows each layer's relative MSE is "
                                     "measured on (null: all)")
    save: str | None = None
    format: str = "qcore"

    def resolved_scheme(self) -> QuantScheme:
        if isinstance(self.scheme, QuantScheme):
            return self.scheme.with_group_size(self.group_size)
        return get_scheme(self.scheme, self.group_size)

    @classmethod
    def from_file(cls, path: str | Path) -> RunConfig:
        text = Path(path).read_text()
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
        return cls.model_validate(data or {})


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``key=value`` strings into a dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, _, raw = item.partition("=")
        key = key.strip()
        if not key:
            raise ValueError(f"--set {item!r} has an empty key")
        out[key] = yaml.safe_load(raw) if raw.strip() else ""
    return out
