"""``run_study``: validate the grid, run the cells the cache lacks, then write the table,
plots and findings from everything the cache holds."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qcore.console import duration
from qcore.errors import ConfigError
from qcore.io import atomic_write_json, atomic_write_text
from qcore.plugins import PluginManager, get_plugin_manager
from qcore.versions import package_versions
from qcore_study.cache import CellFolder, StudyLock
from qcore_study.cells import CellOutcome, CellPlan, missing_stages, plan_cell
from qcore_study.executors import make_executor
from qcore_study.findings import Finding, findings, findings_markdown
from qcore_study.grid import StudyGrid, check_grid
from qcore_study.plots import write_plots
from qcore_study.table import build_rows, metric_columns, write_tables


@dataclass
class StudyResult:
    root: Path
    rows: list[dict[str, Any]]
    columns: list[tuple[str, str, str]]
    findings: list[Finding]
    files: dict[str, Any]
    cells: int
    reused: int
    ran: int
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0


def check_study_dir(root: Path) -> None:
    """A study writes only into an empty or missing folder or one of its own."""
    if root.is_file():
        raise ConfigError(f"--out {root} is a file; give a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / "study.lock").exists():
        raise ConfigError(f"--out {root} holds files and is not a qcore study folder (no "
                          "study.lock); choose an empty or new folder")


def cached_pace(plans: list[CellPlan], root: Path) -> float | None:
    """Mean seconds of the cached cells (quantization plus evaluations), from their
    records: what the cells still to run are estimated at before one of them finishes."""
    totals = []
    for plan in plans:
        seconds = 0.0
        for record in CellFolder(root, plan.key).path.glob("*.json"):
            try:
                seconds += float(json.loads(record.read_text(encoding="utf-8"))["seconds"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
        totals.append(seconds)
    return sum(totals) / len(totals) if totals and sum(totals) > 0 else None


def run_study(grid: StudyGrid, out: str | Path, *, executor: str = "sequential",
              ray_address: str | None = None, ray_cpus: int | None = None,
              plugins: PluginManager | None = None,
              report: Callable[[str], None] = lambda line: None) -> StudyResult:
    """Run ``grid`` into the study folder ``out``; ``report`` receives one line per cell
    started and finished."""
    plugins = plugins or get_plugin_manager()
    started = time.perf_counter()
    root = Path(out)
    check_study_dir(root)
    cells = check_grid(grid, plugins, check_available=executor == "sequential")
    runner = make_executor(executor, ray_address, ray_cpus, plugins)
    with StudyLock(root):
        atomic_write_json(root / "grid.json", grid.model_dump(mode="json"))
        plans = [plan_cell(c, grid.keep_models, plugins) for c in cells]
        todo = [p for p in plans if missing_stages(p, root)]
        reused = len(plans) - len(todo)
        pace = cached_pace([p for p in plans if p not in todo], root)
        report(f"{len(plans)} cells: {reused} cached, {len(todo)} to run "
               f"({runner.name} executor); study folder {root}"
               + (f"; ~{duration(pace * len(todo))} at the cached cells' pace"
                  if pace and todo else ""))
        failed: list[str] = []
        spent: list[float] = []

        def on_start(plan: CellPlan) -> None:
            report(f"[{len(spent) + 1}/{len(todo)}] {plan.cell.label}: running "
                   f"{', '.join(missing_stages(plan, root))}")

        def on_done(plan: CellPlan, outcome: CellOutcome) -> None:
            spent.append(outcome.seconds)
            state = (f"failed: {', '.join(outcome.failed)}" if outcome.failed else "done")
            left = len(todo) - len(spent)
            eta = f"; ~{duration(sum(spent) / len(spent) * left)} left" if left else ""
            report(f"[{len(spent)}/{len(todo)}] {plan.cell.label}: {state} "
                   f"({outcome.seconds:.1f} s){eta}")
            if outcome.failed:
                failed.append(plan.cell.label)

        runner.run(todo, root, on_done, on_start if runner.name == "sequential" else None)
        rows = build_rows(plans, root)
        columns = metric_columns(plans, plugins)
        items = findings(rows)
        seconds = time.perf_counter() - started
        extra = {"title": grid.title, "cells": len(plans), "reused": reused,
                 "ran": len(todo), "failed": failed, "seconds": seconds,
                 "versions": package_versions(),
                 "findings": [f.model_dump() for f in items]}
        files: dict[str, Any] = write_tables(rows, columns, root, extra)
        plots, why = write_plots(rows, root)
        files["plots"] = plots
        if why:
            files["plots_skipped"] = why
        atomic_write_text(root / "findings.md", findings_markdown(items))
        files["findings"] = str(root / "findings.md")
    return StudyResult(root=root, rows=rows, columns=columns, findings=items, files=files,
                       cells=len(plans), reused=reused, ran=len(todo), failed=failed,
                       seconds=seconds)
