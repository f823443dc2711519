"""Pydantic records that cross plugin boundaries: layer and run reports, evaluation results."""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator


class LayerReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    method: str
    relative_mse: float = Field(
        description="||y_q - y_fp||^2 / ||y_fp||^2 over the first error_windows calibration "
                    "windows; NaN (null in JSON) when not measured (error_windows 0)")
    error_windows: int = Field(default=0,
                               description="calibration windows relative_mse is measured on")
    seconds: float
    stats: dict[str, Any] = Field(default_factory=dict, description="per-method statistics")

    @field_validator("relative_mse", mode="before")
    @classmethod
    def _null_is_not_measured(cls, value: Any) -> Any:
        return math.nan if value is None else value


class QuantizationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    scheme: dict[str, Any]
    layers: list[LayerReport] = Field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None
    notices: list[str] = Field(default_factory=list, description="choices the run made for "
                               "the user, e.g. a preset's group size that did not fit")


class EvaluationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evaluator: str
    metrics: dict[str, float]
    details: dict[str, Any] = Field(default_factory=dict)
