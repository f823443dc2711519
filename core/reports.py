"""Pydantic records that cross plugin boundaries: layer and run reports, evaluation results."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LayerReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    index: int
    name: str
    method: str
    relative_mse: float = Field(
        description="||y_q - y_fp||^2 / ||y_fp||^2 over the first error_windows calibration "
                    "windows")
    error_windows: int = Field(default=0, description="calibration windows relative_mse is "
                                                     "measured on")
    seconds: float
    stats: dict[str, Any] = Field(default_factory=dict, description="per-method statistics")


class QuantizationReport(BaseModel):
    model_config = ConfigDict(extra="forbid")

    method: str
    scheme: dict[str, Any]
    layers: list[LayerReport] = Field(default_factory=list)
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    peak_device_mb: float | None = None


class EvaluationResult(BaseModel):
    model_config = ConfigDict(extra="forbid")

    evaluator: str
    metrics: dict[str, float]
    details: dict[str, Any] = Field(default_factory=dict)
