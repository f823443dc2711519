"""The ``qcore study`` subcommand: run a grid (a file, or a built-in one) into a study
folder and print its table, failures and findings (or all of it as JSON)."""

from __future__ import annotations

import argparse
from typing import Any

from qcore.console import add_command, console, out, print_json, print_uncut
from qcore.errors import ConfigError

HELP = ("run a models x methods x schemes grid as cached, resumable cells; write the table, "
        "plots and findings")

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``qcore study``'s arguments, on argparse's ``subparsers``."""
    p = add_command(subparsers, "study", HELP)
    p.add_argument("grid", nargs="?", metavar="GRID.yaml",
                   help="the grid (YAML/JSON; see examples/study-r1-distill.yaml); default: "
                        "the built-in SmolLM2-135M grid")
    p.add_argument("--quick", action="store_true",
                   help="a reduced built-in grid (5 cells, tiny calibration): a smoke run")
    p.add_argument("--out", default="qcore-study", metavar="DIR",
                   help="the study folder: cache, tables, plots; rerunning into it redoes "
                        "only the unfinished cells")
    p.add_argument("--executor", choices=["sequential", "ray"], default="sequential",
                   help="cells one after another here, or as Ray tasks")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="a running Ray cluster to join (default: start a local one)")
    p.add_argument("--ray-cpus", type=int, default=None, metavar="N",
                   help="CPUs of the local Ray cluster (default: all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """``qcore study``; a :class:`~qcore.errors.ConfigError` (bad grid, busy or foreign
    study folder) propagates to the CLI, which prints it and exits with code 2."""
    from qcore_study.defaults import default_grid, quick_grid
    from qcore_study.grid import StudyGrid
    from qcore_study.runner import run_study

    if args.grid and args.quick:
        raise ConfigError("give a grid file or --quick, not both")
    grid = (StudyGrid.from_file(args.grid) if args.grid
            else quick_grid() if args.quick else default_grid())
    report = (lambda line: None) if args.json else (
        lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    result = run_study(grid, args.out, executor=args.executor, ray_address=args.ray_address,
                       ray_cpus=args.ray_cpus, report=report)
    if args.json:
        print_json({"out": str(result.root), "cells": result.cells, "reused": result.reused,
                    "ran": result.ran, "failed": result.failed,
                    "seconds": round(result.seconds, 1), "files": result.files,
                    "findings": [f.model_dump() for f in result.findings],
                    "rows": [{k: v for k, v in r.items() if k != "layers"}
                             for r in result.rows]})
        return 0
    _print_results(grid.title, result)
    return 0


def _print_results(title: str, result: Any) -> None:
    """The summary table, each failed stage, the findings and a closing line."""
    from qcore_study.table import fmt, summary

    header, body = summary(result.rows, result.columns)
    print_uncut(title, header, [[fmt(v) for v in row] for row in body],
                 left=("model", "method", "scheme", "backend", "status"))
    for r in result.rows:
        for stage, error in r["errors"].items():
            out.print(f"{r['model']} / {r['method']} / {r['scheme']}: {stage} failed: {error}",
                      style="red", markup=False, soft_wrap=True)
    for i, f in enumerate(result.findings, 1):
        out.print(f"{i}. {f.title}: " + (f.statement or f"not stated: {f.missing}"),
                  markup=False, soft_wrap=True)
    out.print(f"{result.cells} cells ({result.reused} cached, {result.ran} run, "
              f"{len(result.failed)} with failures) in {result.seconds:.0f} s; table "
              f"{result.files['markdown']}, findings {result.files['findings']}, "
              f"{len(result.files['plots'])} plots in {result.root / 'plots'}",
              markup=False, soft_wrap=True)
