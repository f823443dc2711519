"""The ``qcore`` command line: quantize, evaluate, export, study, list-plugins, schemes, demo."""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qcore import api
from qcore.config import CalibrationConfig, RunConfig, parse_assignments, validation_summary
from qcore.errors import QcoreError
from qcore.interfaces import DataSpec
from qcore.io import dumps_json
from qcore.plugins import PluginError, get_plugin_manager
from qcore.schemes import PRESETS

console = Console(stderr=True)
out = Console()


def _data_spec(source: str, part: str, dataset: str | None, field: str | None) -> DataSpec:
    return DataSpec(source=source, part=part, dataset=dataset, field=field)


def _print_json(data: Any) -> None:
    """Strict JSON on stdout: NaN/infinity become null (bare NaN is not JSON)."""
    print(dumps_json(data, indent=2))


def _print_uncut(title: str, header: Sequence[str], cells: list[list[str]],
                 left: Sequence[str] | None = None) -> None:
    """A rich table whose cells are never cut or wrapped: on a narrow terminal its lines
    run longer instead. Columns named in ``left`` (all when None) align left, the others
    right."""
    widths = [max([len(c), *(len(row[i]) for row in cells)]) for i, c in enumerate(header)]
    table = Table(title=title)
    for col, width in zip(header, widths, strict=True):
        table.add_column(col, no_wrap=True, min_width=width,
                         justify="left" if left is None or col in left else "right")
    for row in cells:
        table.add_row(*row)
    wide = Console(file=out.file, width=max(out.width, sum(widths) + 3 * len(widths) + 1))
    wide.print(table, crop=False)


# ----------------------------------------------------------------------------- list-plugins
def cmd_list_plugins(args: argparse.Namespace) -> int:
    listing = get_plugin_manager().listing()
    if args.json:
        _print_json(listing)
        return 0
    rows = sorted(listing["registrations"], key=lambda r: (r["kind"], r["name"]))
    columns = ("kind", "name", "plugin", "version", "module", "distribution")
    cells = [[r[c] or "-" for c in columns] for r in rows]
    _print_uncut("qcore plugins", columns, cells)
    for fail in listing["failures"]:
        out.print(f"plugin {fail['name']} ({fail['distribution'] or 'no distribution'}) "
                  f"left out at {fail['stage']}: {fail['error']}", style="red", markup=False,
                  soft_wrap=True)
    if listing["blocked"]:
        out.print(f"blocked by QCORE_BLOCK_PLUGINS: {', '.join(listing['blocked'])}",
                  soft_wrap=True)
    for name in listing["unknown_blocked"]:
        out.print(f"warning: QCORE_BLOCK_PLUGINS names {name!r}, which is not an installed "
                  "plugin", style="yellow", markup=False, soft_wrap=True)
    return 0


def cmd_schemes(args: argparse.Namespace) -> int:
    data = {name: s.model_dump(mode="json", exclude={"name"}) for name, s in PRESETS.items()}
    if args.json:
        _print_json(data)
        return 0
    table = Table(title="scheme presets")
    for col in ("scheme", "weights", "activations", "kv cache"):
        table.add_column(col)
    for name, s in PRESETS.items():
        table.add_row(name, s.weights.describe(),
                      s.activations.describe() if s.activations else "-",
                      s.kv_cache.describe() if s.kv_cache else "-")
    out.print(table)
    return 0


# ----------------------------------------------------------------------------- quantize
def _run_config(args: argparse.Namespace) -> RunConfig:
    base: dict[str, Any] = {}
    if args.config:
        base = RunConfig.from_file(args.config).model_dump(exclude_unset=True)
    cal = dict(base.get("calibration", {}))
    if args.calib is not None:
        cal["data"] = _data_spec(args.calib, args.calib_part, args.calib_dataset,
                                 args.calib_field)
    for key in ("samples", "seq_len", "sampling", "seed", "batch_size"):
        value = getattr(args, key)
        if value is not None:
            cal[key] = value
    for key in ("model", "method", "scheme", "group_size", "observer", "backend",
                "propagation", "error_windows", "save", "format", "dtype", "max_shard_size",
                "activation_budget", "offload_dir"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    for flag, key, value in (("overwrite", "overwrite", True), ("resume", "resume", True),
                             ("no_stream", "stream", False)):
        if getattr(args, flag):
            base[key] = value
    if args.set:
        base["method_config"] = {**base.get("method_config", {}), **parse_assignments(args.set)}
    if "model" not in base:
        raise api.ConfigError("--model is required (or 'model:' in --config)")
    try:
        base["calibration"] = CalibrationConfig.model_validate(cal)
        return RunConfig.model_validate(base)
    except ValidationError as exc:
        raise api.ConfigError(f"run configuration: {validation_summary(exc)}") from exc


def _layer_table(report) -> Table:
    table = Table(title=f"{report.method}: per-layer reconstruction")
    table.add_column("layer")
    windows = report.layers[0].error_windows if report.layers else 0
    table.add_column(f"relative MSE ({windows} windows)", justify="right")
    table.add_column("seconds", justify="right")
    for layer in report.layers:
        table.add_row(layer.name, f"{layer.relative_mse:.3e}", f"{layer.seconds:.2f}")
    return table


def cmd_quantize(args: argparse.Namespace) -> int:
    config = _run_config(args)
    result = api.quantize(config, progress=not args.json and not args.no_progress)
    report = result.report
    summary = {
        "method": report.method, "scheme": config.resolved_scheme().name,
        "seconds": round(report.seconds, 2), "peak_rss_mb": round(report.peak_rss_mb, 1),
        "mean_relative_mse": sum(x.relative_mse for x in report.layers) / len(report.layers),
        "saved": str(result.saved) if result.saved else None,
        "layers": [x.model_dump() for x in report.layers],
    }
    if args.json:
        _print_json(summary)
    else:
        out.print(_layer_table(report))
        out.print(f"quantized with {report.method} in {report.seconds:.1f}s, peak RSS "
                  f"{report.peak_rss_mb:.0f} MB" + (f"; saved to {result.saved}"
                                                    if result.saved else ""))
    return 0


# ----------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    options: dict[str, Any] = parse_assignments(args.set or [])
    # the common flags fill the evaluator's config fields of the same name, whatever the
    # evaluator (--set wins); an evaluator without such a field never sees the flag
    fields = get_plugin_manager().get("evaluator", args.evaluator).Config.model_fields
    flags = {"data": _data_spec(args.data, args.data_part, args.data_dataset, args.data_field),
             "seq_len": args.seq_len, "windows": args.windows, "stride": args.stride,
             "batch_size": args.batch_size, "progress": not args.json,
             "reference": args.reference}
    # an evaluator that takes the reference model itself (layer-error) gets --reference;
    # for the others it means "evaluate that model too and show the change"
    compare = args.reference if "reference" not in fields else None
    for key, value in flags.items():
        if key in fields and value is not None:
            options.setdefault(key, value)
    api.build_evaluator(args.evaluator, options)  # validate before loading the model
    result, meta, seconds = _evaluate_one(args.model, args, options)
    payload = {"model": args.model, "evaluator": result.evaluator, **result.metrics,
               "seconds": round(seconds, 2),
               "quantized": meta is not None, "details": result.details}
    reference = None
    if compare:
        ref_options = dict(options)
        if ref_options.get("records"):  # an evaluator's per-item file: one per model
            stem = Path(str(ref_options["records"]))
            ref_options["records"] = str(stem.with_name(f"{stem.stem}.reference{stem.suffix}"))
        reference, _, _ = _evaluate_one(compare, args, ref_options)
        payload["reference"] = {"model": compare, **reference.metrics,
                                "details": reference.details}
        payload["change"] = {k: v - reference.metrics[k] for k, v in result.metrics.items()
                             if isinstance(v, (int, float)) and k in reference.metrics}
    if args.json:
        _print_json(payload)
        return 0
    table = Table(title=f"{result.evaluator} of {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if reference is not None:
        table.add_column(f"reference ({compare})", justify="right")
        table.add_column("change", justify="right")
    for k, v in result.metrics.items():
        row = [k, _fmt(v)]
        if reference is not None:
            row += [_fmt(reference.metrics.get(k)), _fmt(payload["change"].get(k), sign=True)]
        table.add_row(*row)
    out.print(table)
    rows = result.details.get("table")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):  # per-item detail
        detail = Table(title=f"{result.evaluator} details")
        for col in rows[0]:
            detail.add_column(str(col), justify="left" if col in ("name", "backend")
                              else "right")
        for row in rows:
            detail.add_row(*(_fmt(v) if not isinstance(v, str) else v for v in row.values()))
        out.print(detail)
    for key in ("plot", "records"):
        if key in result.details:
            out.print(f"{key}: {result.details[key]}")
    return 0


def _fmt(value: Any, sign: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    return f"{value:+g}" if sign else f"{value:g}"


def _evaluate_one(source: str, args: argparse.Namespace, options: dict[str, Any]):
    """Load one model, evaluate it, let it go; (result, qcore metadata or None, seconds
    the evaluation took, loading excluded)."""
    stream = True if getattr(args, "stream", False) else None
    model, tokenizer, meta = api.load_model(source)
    if tokenizer is None:
        raise api.ConfigError(f"{source} has no tokenizer files")
    t0 = time.perf_counter()
    result = api.evaluate(model, tokenizer, args.evaluator, options, backend=args.backend,
                          page_layers=stream)
    return result, meta, time.perf_counter() - t0


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    saved = api.export_model(args.model, args.format, args.out, overwrite=args.overwrite,
                             max_shard_size=args.max_shard_size)
    summary = saved.metadata.get("export", {})
    if args.json:
        _print_json({"out": str(saved.path), **summary})
        return 0
    layers = summary.get("layers", {})
    kinds: dict[str, int] = {}
    for info in layers.values():
        key = f"{info['format']}: {info['weights']}" + (
            f", activations {info['activations']}" if info.get("activations") else "")
        kinds[key] = kinds.get(key, 0) + 1
    out.print(f"wrote {saved.path} ({args.format}): {summary.get('tensors', '?')} tensors, "
              f"{summary.get('bytes', 0) / 2**20:.1f} MiB in "
              f"{', '.join(summary.get('files', [])) or '?'}", markup=False, soft_wrap=True)
    for key, count in kinds.items():
        out.print(f"  {count} linears {key}", markup=False, soft_wrap=True)
    if summary.get("ignore"):
        out.print(f"  left in float: {', '.join(summary['ignore'])}", markup=False,
                  soft_wrap=True)
    return 0


# ----------------------------------------------------------------------------- study
def cmd_study(args: argparse.Namespace) -> int:
    from qcore import study
    from qcore.study.table import fmt, summary

    if args.grid and args.quick:
        raise api.ConfigError("give a grid file or --quick, not both")
    grid = (study.StudyGrid.from_file(args.grid) if args.grid
            else study.quick_grid() if args.quick else study.default_grid())
    report = (lambda line: None) if args.json else (
        lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    result = study.run_study(grid, args.out, executor=args.executor,
                             ray_address=args.ray_address, ray_cpus=args.ray_cpus,
                             report=report)
    if args.json:
        _print_json({"out": str(result.root), "cells": result.cells,
                     "reused": result.reused, "ran": result.ran, "failed": result.failed,
                     "seconds": round(result.seconds, 1), "files": result.files,
                     "findings": [f.model_dump() for f in result.findings],
                     "rows": [{k: v for k, v in r.items() if k != "layers"}
                              for r in result.rows]})
        return 0
    header, body = summary(result.rows, result.columns)
    _print_uncut(grid.title, header, [[fmt(v) for v in row] for row in body],
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
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    """Full precision vs RTN W4A16 g64 on SmolLM2-135M with offline text (pydoc topics)."""
    calib = DataSpec(source=args.data, part="head")
    held_out = DataSpec(source=args.data, part="tail")
    model, tokenizer, _ = api.load_model("smollm2")
    ppl_options = {"data": held_out, "seq_len": args.seq_len, "windows": args.windows}
    rows = []
    fp = api.evaluate(model, tokenizer, "perplexity", ppl_options).metrics
    rows.append({"model": "SmolLM2-135M", "method": "full precision", "scheme": "fp32",
                 "perplexity": fp["perplexity"], "seconds": 0.0})
    config = RunConfig(model="smollm2", method="rtn", scheme="W4A16", group_size=64,
                       calibration=CalibrationConfig(data=calib, samples=args.samples,
                                                     seq_len=args.seq_len),
                       save=args.save)
    q = api.quantize(config, model=copy.deepcopy(model), tokenizer=tokenizer,
                     progress=not args.json)
    qm = api.evaluate(q.model, tokenizer, "perplexity", ppl_options).metrics
    rows.append({"model": "SmolLM2-135M", "method": "rtn", "scheme": "W4A16 asym g64",
                 "perplexity": qm["perplexity"], "seconds": round(q.report.seconds, 2)})
    info = {"calibration": f"{args.data} head, {args.samples} x {args.seq_len} tokens",
            "evaluation": f"{args.data} tail, first {args.windows} windows of {args.seq_len}",
            "peak_rss_mb": round(q.report.peak_rss_mb, 1), "rows": rows}
    if args.json:
        _print_json(info)
        return 0
    table = Table(title="qcore demo: SmolLM2-135M-Instruct, RTN W4A16 (asymmetric, group 64)")
    for col in ("method", "scheme", "perplexity", "quantize s"):
        table.add_column(col, justify="right" if col != "method" else "left")
    for r in rows:
        table.add_row(r["method"], r["scheme"], f"{r['perplexity']:.2f}", f"{r['seconds']:.1f}")
    out.print(table)
    out.print(f"calibration: {info['calibration']}; evaluation: {info['evaluation']}; "
              f"peak RSS {info['peak_rss_mb']:.0f} MB")
    return 0


# ----------------------------------------------------------------------------- parser
def _default(model: type, field: str) -> str:
    """A pydantic field's default as help text shows it (the CLI flag defaults to unset so
    that --config values are not overridden)."""
    value = model.model_fields[field].get_default(call_default_factory=True)
    return "all" if value is None and field == "error_windows" else str(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options with a real default, nothing for unset ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in text:
            return text
        return super()._get_help_string(action)


def _add_data_args(p: argparse.ArgumentParser, prefix: str, default_part: str) -> None:
    p.add_argument(f"--{prefix}-part", choices=["all", "head", "tail"], default=default_part,
                   help="use the whole text, or its first/second half split at an article "
                        "boundary near the middle")
    p.add_argument(f"--{prefix}-dataset", default=None, metavar="NAME",
                   help="dataset plugin that reads the source (default: detected from it: "
                        ".txt/.md text, .jsonl, pydoc, hf:NAME:SPLIT)")
    p.add_argument(f"--{prefix}-field", default=None, metavar="FIELD",
                   help="text field of JSONL/HF records (default: 'text', or question + "
                        "answer)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcore", description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)

    p = command("list-plugins", "installed plugins, what they register, and any left out")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list_plugins)

    p = command("schemes", "the scheme presets")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_schemes)

    cal, run = CalibrationConfig, RunConfig
    p = command("quantize", "quantize a model layer by layer (and save it)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML/JSON run configuration; flags override its values")
    p.add_argument("--model", help="HF folder, .gguf file, hub id (online only), or 'smollm2' "
                                   "(the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--method", help=f"quantizer name, see list-plugins (default: "
                                    f"{_default(run, 'method')})")
    p.add_argument("--scheme", help=f"preset: {', '.join(PRESETS)} (default: "
                                    f"{_default(run, 'scheme')})")
    p.add_argument("--group-size", type=int, dest="group_size", metavar="N",
                   help="weight group size (default: the preset's, 128 for W4A16/W3A16; it "
                        "must divide every layer's input features: SmolLM2's 576 needs 64)")
    p.add_argument("--observer", choices=["minmax", "mse"],
                   help="how each weight row/group range is chosen: min/max, or the MSE "
                        "clip search (default: minmax)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the method's config, value in YAML (repeatable; "
                        "default: none)")
    p.add_argument("--calib", metavar="SOURCE",
                   help="calibration text: a .txt/.jsonl file, 'pydoc', or hf:NAME:SPLIT "
                        f"(default: {run.model_fields['calibration'].default.data.source})")
    _add_data_args(p, "calib", "all")
    p.add_argument("--samples", type=int, metavar="N",
                   help=f"calibration windows (default: {_default(cal, 'samples')})")
    p.add_argument("--seq-len", type=int, dest="seq_len", metavar="L",
                   help=f"tokens per calibration window (default: {_default(cal, 'seq_len')})")
    p.add_argument("--sampling", choices=["consecutive", "random"],
                   help="windows from the start of the text, or at seeded random offsets "
                        f"(default: {_default(cal, 'sampling')})")
    p.add_argument("--seed", type=int, help=f"seed of --sampling random (default: "
                                            f"{_default(cal, 'seed')})")
    p.add_argument("--batch-size", type=int, dest="batch_size", metavar="N",
                   help=f"calibration windows per forward (default: "
                        f"{_default(cal, 'batch_size')})")
    p.add_argument("--backend", help=f"where layers run: cpu, npu (default: "
                                     f"{_default(run, 'backend')})")
    p.add_argument("--propagation", choices=["quantized", "full"],
                   help="next layer's inputs: the quantized or the float layer's outputs "
                        "(default: the method's)")
    p.add_argument("--error-windows", type=int, dest="error_windows", metavar="N",
                   help="calibration windows each layer's relative MSE is measured on; 0: "
                        "none, and RTN weight-only runs no forward at all "
                        f"(default: {_default(run, 'error_windows')})")
    p.add_argument("--save", metavar="DIR",
                   help="output folder, written atomically; must not exist or be empty "
                        "unless --overwrite (default: not saved)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing saved model at --save (never a folder holding "
                        "other files, an input or the current directory)")
    p.add_argument("--format", help=f"save format plugin (default: {_default(run, 'format')})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the float model in memory; methods compute Hessians, "
                        "searches and training in float32 per layer (default: auto, the "
                        "checkpoint's own)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run of the same configuration from the "
                        "layers already written for --save")
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole float model first and save it whole at the end "
                        "(default: one decoder layer at a time for safetensors folders)")
    p.add_argument("--max-shard-size", dest="max_shard_size", metavar="SIZE",
                   help="largest output shard, e.g. 500MB, 2GB (default: the format's)")
    p.add_argument("--activation-budget", dest="activation_budget", metavar="SIZE",
                   help="memory the calibration activations may use, e.g. 4GB; beyond it "
                        "they go to disk and are read back a batch at a time (default: half "
                        "the memory available at the start)")
    p.add_argument("--offload-dir", dest="offload_dir", metavar="DIR",
                   help="where offloaded activations go (default: the system's temporary "
                        "folder)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or per-layer lines when stderr is not a terminal)")
    p.set_defaults(func=cmd_quantize)

    p = command("evaluate", "evaluate a float or saved quantized model")
    p.add_argument("--model", required=True, help="a saved qcore model, HF folder, .gguf "
                                                  "file, hub id, or 'smollm2'")
    p.add_argument("--evaluator", default="perplexity", help="evaluator plugin name")
    p.add_argument("--data", default="pydoc", metavar="SOURCE",
                   help="evaluation text: a .txt/.jsonl file, 'pydoc', or hf:NAME:SPLIT")
    _add_data_args(p, "data", "all")
    p.add_argument("--seq-len", type=int, default=512, dest="seq_len", metavar="L",
                   help="tokens per window")
    p.add_argument("--windows", type=int, default=None, metavar="N",
                   help="score the first N windows (default: all)")
    p.add_argument("--stride", type=int, default=None, metavar="S",
                   help="window step; below --seq-len the windows overlap (default: seq-len)")
    p.add_argument("--stream", action="store_true",
                   help="keep about one decoder layer in memory: drop each layer's pages "
                        "(mapped from the safetensors of a saved model, or of a float32 "
                        "folder) after its forward; same numbers (default: only for a model "
                        "larger than half the available memory)")
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size", metavar="N",
                   help="windows per forward")
    p.add_argument("--backend", default="cpu", help="where the model runs")
    p.add_argument("--reference", metavar="MODEL", default=None,
                   help="also evaluate this model (e.g. the float one) with the same "
                        "options and show each metric's change against it")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the evaluator's config (repeatable; default: none)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_evaluate)

    p = command("export", "write a quantized model in a serving format "
                          "(compressed-tensors for vLLM)")
    p.add_argument("--model", required=True, help="a saved qcore model (or a checkpoint a "
                                                  "format plugin reads)")
    p.add_argument("--format", required=True, help="format plugin, e.g. compressed-tensors")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output folder, written atomically; must not exist or be empty "
                        "unless --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing saved model at --out")
    p.add_argument("--max-shard-size", dest="max_shard_size", default=None, metavar="SIZE",
                   help="largest safetensors shard, e.g. 5GB (default: transformers', 50GB)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_export)

    p = command("study", "run a models x methods x schemes grid as cached, resumable cells; "
                         "write the table, plots and findings")
    p.add_argument("grid", nargs="?", metavar="GRID.yaml",
                   help="the grid (YAML/JSON; see examples/study-r1-distill.yaml); default: "
                        "the built-in SmolLM2-135M grid")
    p.add_argument("--quick", action="store_true",
                   help="a reduced built-in grid (4 cells, tiny calibration): a smoke run")
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
    p.set_defaults(func=cmd_study)

    p = command("demo", "SmolLM2-135M: full precision vs RTN W4A16 g64 (offline)")
    p.add_argument("--data", default="pydoc", metavar="SOURCE",
                   help="text: calibrated on its first half, evaluated on its second")
    p.add_argument("--samples", type=int, default=32, metavar="N", help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512, dest="seq_len", metavar="L",
                   help="tokens per window")
    p.add_argument("--windows", type=int, default=16, metavar="N", help="evaluation windows")
    p.add_argument("--save", default=None, metavar="DIR",
                   help="also save the RTN model there (default: not saved)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")
    p.set_defaults(func=cmd_demo)

    get_plugin_manager().call_isolated("qcore_register_commands", subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (QcoreError, PluginError, OSError, ValueError) as exc:
        message = " ".join(str(exc).split()) or type(exc).__name__
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False,
                      soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
