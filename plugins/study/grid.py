"""The study grid: models x methods x schemes x backends, validated, expanded into cells.

A grid is a YAML/JSON mapping (:class:`StudyGrid`). Every method entry runs on each scheme
of the grid (or of its own ``schemes``), on each model and backend; each model also gets
a float baseline cell (``baseline: true``) that the findings compare against. Every
evaluator runs on every cell it applies to (its ``schemes``; evaluators that compare with
the float model themselves, such as ``layer-error``, skip the baseline).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from qcore.config import CalibrationConfig, RunConfig, load_mapping, validation_summary
from qcore.errors import ConfigError, QcoreError
from qcore.interfaces import DataSpec
from qcore.plugins import PluginError, PluginManager
from qcore.schemes import PRESETS

#: the scheme name of a model's float baseline cell
BASELINE = "fp"


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    path: str = Field(description="HF folder, .gguf file, hub id, or 'smollm2'")
    name: str | None = Field(default=None, description="label in the table (default: the "
                                                       "path's last part)")

    @property
    def label(self) -> str:
        return self.name or Path(self.path.rstrip("/")).name or self.path


class MethodEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(description="quantizer plugin name")
    name: str | None = Field(default=None, description="label (default: the method name); "
                                                       "two entries of one method need two")
    options: dict[str, Any] = Field(default_factory=dict, description="the method's config")
    schemes: list[str] | None = Field(default=None, description="this entry's schemes "
                                                                "(default: the grid's)")
    group_size: int | None = Field(default=None, gt=0, description="overrides the grid's "
                                   "(grouped presets only)")
    observer: Literal["minmax", "mse"] | None = Field(
        default=None, description="weight range observer (default: the scheme's, minmax)")

    @property
    def label(self) -> str:
        return self.name or self.method


class EvaluatorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    evaluator: str = Field(description="evaluator plugin name")
    name: str | None = Field(default=None, description="label (default: the evaluator "
                                                       "name)")
    options: dict[str, Any] = Field(default_factory=dict)
    schemes: list[str] | None = Field(default=None, description="only cells of these "
                                      f"schemes ('{BASELINE}': the float baseline); default "
                                      "all")

    @property
    def label(self) -> str:
        return self.name or self.evaluator


class StudyGrid(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = "qcore study"
    models: list[ModelEntry] = Field(min_length=1)
    methods: list[MethodEntry] = Field(min_length=1)
    schemes: list[str] = Field(default_factory=lambda: ["W4A16"], min_length=1)
    group_size: int | None = Field(default=None, gt=0, description="weight group size of "
                                   "the grouped presets (W4A16, W3A16; default: the "
                                   "preset's); per-channel presets (W8A8, W4A4) stay so")
    calibration: CalibrationConfig = CalibrationConfig()
    evaluators: list[EvaluatorEntry] = Field(min_length=1)
    backends: list[str] = Field(default_factory=lambda: ["cpu"], min_length=1)
    baseline: bool = Field(default=True, description="evaluate each model in float too")
    keep_models: bool = Field(default=True, description="save each quantized model in the "
                              "cache, so a cell interrupted during evaluation (or given a "
                              "new evaluator) is not quantized again")
    error_windows: int | None = Field(default=4, gt=0)

    @field_validator("methods", "evaluators")
    @classmethod
    def _distinct_labels(cls, entries: list[Any]) -> list[Any]:
        labels = [e.label for e in entries]
        twice = sorted({x for x in labels if labels.count(x) > 1})
        if twice:
            raise ValueError(f"entries share the label(s) {', '.join(twice)}; give each a "
                             "distinct name")
        return entries

    @classmethod
    def from_file(cls, path: str | Path) -> StudyGrid:
        try:
            return cls.model_validate(load_mapping(path))
        except ValidationError as exc:
            raise ConfigError(f"{path}: {validation_summary(exc)}") from exc


class Cell(BaseModel):
    """One model x method x scheme x backend: a quantization (none for the baseline) and
    the evaluations that apply to it."""

    model_config = ConfigDict(extra="forbid")
    model: ModelEntry
    method: MethodEntry | None = Field(description="None: the float baseline")
    scheme: str
    backend: str
    run: RunConfig | None = Field(description="the quantization (None: baseline)")
    evaluators: list[EvaluatorEntry]

    @property
    def label(self) -> str:
        method = self.method.label if self.method else BASELINE
        return f"{self.model.label} / {method} / {self.scheme} / {self.backend}"

    @property
    def is_baseline(self) -> bool:
        return self.method is None


def expand(grid: StudyGrid, not_on_baseline: set[str] = frozenset()) -> list[Cell]:
    """The grid's cells, baselines first for each model, in grid order. Evaluators named in
    ``not_on_baseline`` (those that compare with the float model) skip the baselines."""
    cells = []
    for model in grid.models:
        for backend in grid.backends:
            if grid.baseline:
                cells.append(Cell(model=model, method=None, scheme=BASELINE, backend=backend,
                                  run=None, evaluators=[
                                      e for e in _applicable(grid, BASELINE)
                                      if e.evaluator not in not_on_baseline]))
            for method in grid.methods:
                for scheme in method.schemes or grid.schemes:
                    run = RunConfig(model=model.path, method=method.method, scheme=scheme,
                                    group_size=cell_group_size(grid, method, scheme),
                                    observer=method.observer, method_config=method.options,
                                    calibration=grid.calibration, backend=backend,
                                    error_windows=grid.error_windows)
                    cells.append(Cell(model=model, method=method, scheme=scheme,
                                      backend=backend, run=run,
                                      evaluators=_applicable(grid, scheme)))
    return cells


def cell_group_size(grid: StudyGrid, method: MethodEntry, scheme: str) -> int | None:
    """The group size a cell quantizes with: the method's or the grid's, for presets whose
    weights are grouped; None (the preset's own) otherwise."""
    preset = PRESETS.get(scheme.upper())
    if preset is None or preset.weights.granularity != "group":
        return None
    return method.group_size or grid.group_size


def _applicable(grid: StudyGrid, scheme: str) -> list[EvaluatorEntry]:
    return [e for e in grid.evaluators if e.schemes is None or scheme in e.schemes]


def study_options(entry: EvaluatorEntry, cell: Cell, fields: dict[str, Any]) -> dict[str, Any]:
    """An evaluator's options for one cell: the study fills what only it knows (the float
    reference of an evaluator that compares with one, no plot or progress bar of its own);
    the grid's options win."""
    options = dict(entry.options)
    if "reference" in fields:
        options.setdefault("reference", cell.model.path)
    if "plot" in fields:
        options.setdefault("plot", "none")  # the study draws its own
    if "progress" in fields:
        options["progress"] = False
    return options


def compares_with_float(fields: dict[str, Any]) -> bool:
    """An evaluator that takes the float model as ``reference`` measures a quantized model
    against it; on the baseline it would measure the float model against itself."""
    return "reference" in fields


class _Problems:
    """The grid's problems as ``where: message`` lines, each message once."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def __call__(self, where: str, exc: Exception | str) -> None:
        text = " ".join(str(exc).split())
        if text not in {p.split(": ", 1)[-1] for p in self.lines}:
            self.lines.append(f"{where}: {text}")


def check_grid(grid: StudyGrid, plugins: PluginManager, check_available: bool = True
               ) -> list[Cell]:
    """Expand the grid and validate everything before any work; every problem is listed
    in one :class:`ConfigError` (unknown methods, schemes, evaluators, backends, models,
    bad options, a method that cannot produce a scheme). ``check_available``: the backends
    must run here (not so for a cluster executor)."""
    problem = _Problems()
    _check_inputs(grid, plugins, check_available, problem)
    _check_methods(grid, plugins, problem)
    not_on_baseline = _check_evaluators(grid, plugins, problem)
    if problem.lines:
        raise ConfigError(f"the grid has {len(problem.lines)} problem(s):\n  "
                          + "\n  ".join(problem.lines))
    return expand(grid, not_on_baseline)


def _check_inputs(grid: StudyGrid, plugins: PluginManager, check_available: bool,
                  problem: _Problems) -> None:
    """The models, scheme names, backends and calibration data."""
    from qcore import api  # api imports the whole core; the grid model does not need it

    for i, model in enumerate(grid.models):
        try:
            api.check_model_source(model.path)
        except QcoreError as exc:
            problem(f"models[{i}] ({model.label})", exc)
    labels = [m.label for m in grid.models]
    for twice in sorted({x for x in labels if labels.count(x) > 1}):
        problem("models", f"two models are labelled {twice!r}; give each a distinct name")
    for scheme in {s for m in grid.methods for s in (m.schemes or grid.schemes)}:
        if scheme.upper() not in PRESETS:
            problem("schemes", f"unknown scheme {scheme!r}; presets: {', '.join(PRESETS)}")
    for backend in grid.backends:
        try:  # on a cluster the backend need only exist where the cells run
            api.build_backend(backend, plugins) if check_available else plugins.get(
                "backend", backend)
        except (PluginError, QcoreError) as exc:
            problem(f"backends ({backend})", exc)
    try:
        api.datasets(plugins).resolve(grid.calibration.data).check(grid.calibration.data)
    except (ValueError, QcoreError) as exc:
        problem("calibration.data", exc)


def _check_methods(grid: StudyGrid, plugins: PluginManager, problem: _Problems) -> None:
    """Each method exists and builds, with its options, for each of its (known) schemes."""
    from qcore import api

    for i, method in enumerate(grid.methods):
        try:
            plugins.get("quantizer", method.method)
        except PluginError as exc:
            problem(f"methods[{i}] ({method.label})", exc)
            continue
        for scheme in method.schemes or grid.schemes:
            if scheme.upper() not in PRESETS:
                continue
            try:
                run = RunConfig(model="-", method=method.method, scheme=scheme,
                                group_size=cell_group_size(grid, method, scheme))
                api.build_quantizer(method.method, run.resolved_scheme(), method.options,
                                    plugins)
            except (PluginError, QcoreError, ValueError) as exc:
                problem(f"methods[{i}] ({method.label}, {scheme})", exc)


def _check_evaluators(grid: StudyGrid, plugins: PluginManager, problem: _Problems
                      ) -> set[str]:
    """Each evaluator exists, builds with its options and names only schemes the grid
    has; returns the evaluators that compare with the float model (not on baselines)."""
    from qcore import api

    not_on_baseline: set[str] = set()
    for i, entry in enumerate(grid.evaluators):
        try:
            fields = plugins.get("evaluator", entry.evaluator).Config.model_fields
        except PluginError as exc:
            problem(f"evaluators[{i}] ({entry.label})", exc)
            continue
        if compares_with_float(fields):
            not_on_baseline.add(entry.evaluator)
            if BASELINE in (entry.schemes or []):
                problem(f"evaluators[{i}] ({entry.label})",
                        f"{entry.evaluator} compares with the float model, so it cannot run "
                        f"on the '{BASELINE}' baseline")
        probe = Cell(model=grid.models[0], method=None, scheme=BASELINE, backend="cpu",
                     run=None, evaluators=[])
        try:
            api.build_evaluator(entry.evaluator, study_options(entry, probe, fields), plugins)
        except (PluginError, QcoreError) as exc:
            problem(f"evaluators[{i}] ({entry.label})", exc)
        known = {BASELINE, *(s for m in grid.methods for s in (m.schemes or grid.schemes))}
        for scheme in entry.schemes or []:
            if scheme not in known:
                problem(f"evaluators[{i}] ({entry.label})",
                        f"schemes names {scheme!r}, which no cell of the grid has "
                        f"({', '.join(sorted(known))})")
    return not_on_baseline


def describe_source(path: str) -> dict[str, Any]:
    """What identifies a model's weights in a cache key: the path, and for a local folder
    or file the names, sizes and modification times of its weight files (a re-converted
    or replaced checkpoint gets new keys)."""
    from qcore import api

    resolved = Path(api.resolve_model_source(path)).expanduser()
    if not resolved.exists():
        return {"path": path}
    files = [resolved] if resolved.is_file() else sorted(
        p for p in resolved.iterdir()
        if p.suffix in (".safetensors", ".bin", ".gguf", ".json") and p.is_file())
    return {"path": path, "files": [[p.name, p.stat().st_size, int(p.stat().st_mtime)]
                                    for p in files]}


def digest(data: Any) -> str:
    """A short stable hash of JSON-able data (sorted keys)."""
    text = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


DEFAULT_EVAL = DataSpec(source="pydoc", part="tail")
DEFAULT_CALIB = DataSpec(source="pydoc", part="head")
