"""Running one cell: quantize (or reuse the cached model), then every evaluator whose
result is not cached yet. Each finished stage is written to the cache at once, so a kill
loses at most the stage that was running; a failing stage is recorded and the cell's
other stages (and the study's other cells) go on."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qcore.hostmemory import peak_rss_mb, reset_peak_rss
from qcore.plugins import PluginManager, get_plugin_manager
from qcore.versions import package_versions
from qcore_study.cache import CellFolder, EvalRecord, QuantRecord
from qcore_study.grid import (
    Cell,
    EvaluatorEntry,
    compares_with_float,
    describe_source,
    digest,
    study_options,
)

log = logging.getLogger(__name__)

QUANTIZE = "quantize"


class CellPlan(BaseModel):
    """A cell with its cache keys: what an executor runs (plain data, so it travels to a
    Ray worker)."""

    model_config = ConfigDict(extra="forbid")
    cell: Cell
    key: str
    eval_keys: dict[str, str]  # evaluator label -> key
    keep_model: bool

    def evaluators(self) -> list[tuple[EvaluatorEntry, str]]:
        return [(e, self.eval_keys[e.label]) for e in self.cell.evaluators]


def plan_cell(cell: Cell, keep_model: bool, plugins: PluginManager) -> CellPlan:
    """Keys: the cell's full configuration (the model's files, the method and its options,
    the resolved scheme, calibration, backend), the package versions and the versions of
    the plugins involved. Each evaluator's key adds its name, options and version."""
    versions = package_versions()
    if cell.run is not None:
        run = cell.run.model_dump(mode="json", exclude={"save", "overwrite", "format"})
        run["scheme"] = cell.run.resolved_scheme().model_dump(mode="json")
        method = plugins.version_of("quantizer", cell.run.method)
    else:
        run, method = {"baseline": True}, None
    key = digest({"model": describe_source(cell.model.path), "run": run,
                  "backend": cell.backend, "versions": versions, "method_version": method})
    eval_keys = {e.label: digest({"cell": key, "evaluator": e.evaluator, "options": e.options,
                                  "version": plugins.version_of("evaluator", e.evaluator)})
                 for e in cell.evaluators}
    return CellPlan(cell=cell, key=key, eval_keys=eval_keys, keep_model=keep_model)


def missing_stages(plan: CellPlan, root: Path) -> list[str]:
    """The stages of a cell the cache does not hold (``quantize``, evaluator labels)."""
    folder = CellFolder(root, plan.key)
    missing = [] if folder.read_quant() is not None else [QUANTIZE]
    return missing + [e.label for e, k in plan.evaluators() if folder.read_eval(e.label, k)
                      is None]


@dataclass
class CellOutcome:
    label: str
    ran: list[str]
    failed: list[str]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "ran": self.ran, "failed": self.failed,
                "seconds": self.seconds}


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a model's parameters and buffers, each storage counted once (tied
    embeddings, shared buffers)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in (*model.parameters(), *model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += key[1]
    return total


def run_cell(plan: CellPlan, root: Path, plugins: PluginManager | None = None
             ) -> CellOutcome:
    """Run the stages of ``plan`` the cache lacks; never raises for a failing stage."""
    plugins = plugins or get_plugin_manager()
    started = time.perf_counter()
    folder = CellFolder(root, plan.key)
    todo = missing_stages(plan, root)
    outcome = CellOutcome(label=plan.cell.label, ran=[], failed=[], seconds=0.0)
    if not todo:
        return outcome
    try:
        model, tokenizer = _model(plan, folder, plugins, outcome)
    except Exception as exc:  # noqa: BLE001 - the study goes on; the record says why
        folder.record_failure(QUANTIZE, exc)
        outcome.failed.append(QUANTIZE)
        log.warning("%s: %s failed: %s", plan.cell.label, QUANTIZE, exc)
        outcome.seconds = time.perf_counter() - started
        return outcome
    folder.clear_failure(QUANTIZE)
    for entry, ekey in plan.evaluators():
        if entry.label not in todo:
            continue
        stage = f"eval-{entry.label}"
        try:
            record = _evaluate(plan, entry, ekey, model, tokenizer, folder, plugins)
        except Exception as exc:  # noqa: BLE001
            folder.record_failure(stage, exc)
            outcome.failed.append(entry.label)
            log.warning("%s: evaluator %s failed: %s", plan.cell.label, entry.label, exc)
            continue
        folder.write(folder.eval_file(entry.label, ekey), record)
        folder.clear_failure(stage)
        outcome.ran.append(entry.label)
    del model, tokenizer
    gc.collect()
    outcome.seconds = time.perf_counter() - started
    return outcome


def _model(plan: CellPlan, folder: CellFolder, plugins: PluginManager, outcome: CellOutcome
           ) -> tuple[nn.Module, Any]:
    """The cell's model: the float one (baseline), the cached quantized one, or a fresh
    quantization (recorded, and saved when the plan keeps models)."""
    from qcore import api

    cell = plan.cell
    record = folder.read_quant()
    if cell.run is None:
        reset_peak_rss()
        model, tokenizer, _ = api.load_model(cell.model.path, plugins, backend=cell.backend)
        if record is None:
            folder.write(folder.quantize_file, QuantRecord(
                key=plan.key, cell=cell.label, seconds=0.0, peak_rss_mb=peak_rss_mb(),
                model_bytes=tensor_bytes(model),
                parameters=sum(p.numel() for p in model.parameters())))
            outcome.ran.append(QUANTIZE)
        return model, tokenizer
    if record is not None and record.saved and (folder.path / record.saved).is_dir():
        try:
            model, tokenizer, _ = api.load_model(str(folder.path / record.saved), plugins,
                                                 backend=cell.backend)
            return model, tokenizer
        except Exception as exc:  # noqa: BLE001 - a damaged cached model is redone
            log.warning("%s: the cached model %s does not load (%s); quantizing again",
                        cell.label, folder.path / record.saved, exc)
    run = cell.run.model_copy(update={
        "save": str(folder.model_dir) if plan.keep_model else None, "overwrite": True})
    folder.path.mkdir(parents=True, exist_ok=True)
    result = api.quantize(run, plugins=plugins, progress=False)
    report = result.report
    folder.write(folder.quantize_file, QuantRecord(
        key=plan.key, cell=cell.label, seconds=report.seconds, peak_rss_mb=report.peak_rss_mb,
        model_bytes=tensor_bytes(result.model), parameters=0,
        layers=[{"name": x.name, "relative_mse": x.relative_mse} for x in report.layers],
        saved=folder.model_dir.name if result.saved else None))
    outcome.ran.append(QUANTIZE)
    return result.model, result.tokenizer


def _evaluate(plan: CellPlan, entry: EvaluatorEntry, ekey: str, model: nn.Module,
              tokenizer: Any, folder: CellFolder, plugins: PluginManager) -> EvalRecord:
    from qcore import api

    fields = plugins.get("evaluator", entry.evaluator).Config.model_fields
    if plan.cell.is_baseline and compares_with_float(fields):
        raise ValueError(f"{entry.evaluator} compares a quantized model with the float one; "
                         "it does not apply to the baseline (list the schemes it runs on)")
    options = study_options(entry, plan.cell, fields)
    if "records" in fields:  # per-item records live with the cell; a rerun resumes them
        records = folder.path / f"records-{entry.label}.jsonl"
        options.setdefault("records", str(records))
        if "resume" in fields and records.exists():
            options.setdefault("resume", True)
    t0 = time.perf_counter()
    with torch.no_grad():
        result = api.evaluate(model, tokenizer, entry.evaluator, options,
                              backend=plan.cell.backend, plugins=plugins)
    return EvalRecord(key=ekey, label=entry.label, evaluator=entry.evaluator,
                      metrics=dict(result.metrics), details=result.details,
                      seconds=time.perf_counter() - t0)
