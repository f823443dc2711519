"""The built-in commands, added through ``qcore_register_commands`` like any plugin's:
quantize, list-plugins and schemes (:mod:`qcore_commands.core_commands`), evaluate,
export and demo (here); clients of the public API."""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path
from typing import Any

from rich.table import Table

from qcore import api
from qcore.config import CalibrationConfig, RunConfig, parse_assignments
from qcore.console import add_command, fmt, out, print_json
from qcore.hookspecs import hookimpl
from qcore.interfaces import DataSpec
from qcore.plugins import get_plugin_manager
from qcore_commands.core_commands import add_core_commands
from qcore_commands.flags import add_data_flags


# ----------------------------------------------------------------------------- evaluate
def evaluation_options(args: argparse.Namespace) -> tuple[dict[str, Any], str | None]:
    """The evaluator's options from ``--set`` and the common flags, validated (before any
    model loads), and the model to compare with (``--reference``, for an evaluator that
    does not take the reference itself)."""
    options: dict[str, Any] = parse_assignments(args.set or [])
    # the common flags fill the evaluator's config fields of the same name, whatever the
    # evaluator (--set wins); an evaluator without such a field never sees the flag
    fields = get_plugin_manager().get("evaluator", args.evaluator).Config.model_fields
    flags = {"data": DataSpec(source=args.data, part=args.data_part, dataset=args.data_dataset,
                              field=args.data_field),
             "seq_len": args.seq_len, "windows": args.windows, "stride": args.stride,
             "batch_size": args.batch_size, "progress": not args.json,
             "reference": args.reference}
    # an evaluator that takes the reference model itself (layer-error) gets --reference;
    # for the others it means "evaluate that model too and show the change"
    compare = args.reference if "reference" not in fields else None
    for key, value in flags.items():
        if key in fields and value is not None:
            options.setdefault(key, value)
    api.build_evaluator(args.evaluator, options)
    return options, compare


def cmd_evaluate(args: argparse.Namespace) -> int:
    options, compare = evaluation_options(args)
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
        print_json(payload)
        return 0
    table = Table(title=f"{result.evaluator} of {args.model}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    if reference is not None:
        table.add_column(f"reference ({compare})", justify="right")
        table.add_column("change", justify="right")
    for k, v in result.metrics.items():
        row = [k, fmt(v)]
        if reference is not None:
            row += [fmt(reference.metrics.get(k)), fmt(payload["change"].get(k), sign=True)]
        table.add_row(*row)
    out.print(table)
    rows = result.details.get("table")
    if isinstance(rows, list) and rows and isinstance(rows[0], dict):  # per-item detail
        detail = Table(title=f"{result.evaluator} details")
        for col in rows[0]:
            detail.add_column(str(col), justify="left" if col in ("name", "backend")
                              else "right")
        for row in rows:
            detail.add_row(*(fmt(v) if not isinstance(v, str) else v for v in row.values()))
        out.print(detail)
    for key in ("plot", "records"):
        if key in result.details:
            out.print(f"{key}: {result.details[key]}")
    return 0




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
                             max_shard_size=args.max_shard_size, progress=not args.json)
    summary = saved.metadata.get("export", {})
    if args.json:
        print_json({"out": str(saved.path), **summary})
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
        print_json(info)
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


def _add_evaluate(sub: Any) -> None:
    p = add_command(sub, "evaluate", "evaluate a float or saved quantized model")
    p.add_argument("--model", required=True, help="a saved qcore model, HF folder, .gguf "
                                                  "file, hub id, or 'smollm2'")
    p.add_argument("--evaluator", default="perplexity", help="evaluator plugin name")
    p.add_argument("--data", default="pydoc", metavar="SOURCE",
                   help="evaluation text: a .txt/.jsonl file, 'pydoc', or hf:NAME:SPLIT")
    add_data_flags(p, "data")
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


def _add_export(sub: Any) -> None:
    p = add_command(sub, "export", "write a quantized model in a serving format "
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


def _add_demo(sub: Any) -> None:
    p = add_command(sub, "demo", "SmolLM2-135M: full precision vs RTN W4A16 g64 (offline)")
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


@hookimpl
def qcore_register_commands(subparsers: Any) -> None:
    for add in (add_core_commands, _add_evaluate, _add_export, _add_demo):
        add(subparsers)
