"""The ``qcore`` command line: quantize, evaluate, list-plugins, schemes, demo."""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.table import Table

from qcore import api
from qcore.config import CalibrationConfig, RunConfig, parse_assignments
from qcore.interfaces import DataSpec
from qcore.plugins import PluginError, get_plugin_manager
from qcore.schemes import PRESETS

console = Console(stderr=True)
out = Console()


def _data_spec(source: str, part: str, dataset: str | None, field: str | None) -> DataSpec:
    return DataSpec(source=source, part=part, dataset=dataset, field=field)


def _add_data_args(p: argparse.ArgumentParser, prefix: str, default_part: str) -> None:
    p.add_argument(f"--{prefix}-part", choices=["all", "head", "tail"], default=default_part,
                   help="use the whole text, or its first/second half split at an article "
                        "boundary near the middle")
    p.add_argument(f"--{prefix}-dataset", default=None,
                   help="dataset plugin name (default: detected from the source)")
    p.add_argument(f"--{prefix}-field", default=None, help="text field for JSONL/HF sources")


def _print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, default=str))


# ----------------------------------------------------------------------------- list-plugins
def cmd_list_plugins(args: argparse.Namespace) -> int:
    listing = get_plugin_manager().listing()
    if args.json:
        _print_json(listing)
        return 0
    table = Table(title="qcore plugins")
    for col in ("kind", "name", "plugin", "version", "distribution", "hooks"):
        table.add_column(col)
    for row in sorted(listing["registrations"], key=lambda r: (r["kind"], r["name"])):
        hooks = ", ".join(h.removeprefix("qcore_") for h in row["hooks"])
        table.add_row(row["kind"], row["name"], row["plugin"], row["version"] or "-",
                      row["distribution"] or "-", hooks)
    out.print(table)
    for fail in listing["failures"]:
        out.print(f"[red]plugin {fail['name']} ({fail['distribution']}) failed at "
                  f"{fail['stage']}: {fail['error']}[/red]")
    if listing["blocked"]:
        out.print(f"blocked: {', '.join(listing['blocked'])}")
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
    for key in ("model", "method", "scheme", "group_size", "backend", "propagation",
                "error_windows", "save", "format"):
        value = getattr(args, key)
        if value is not None:
            base[key] = value
    if args.set:
        base["method_config"] = {**base.get("method_config", {}), **parse_assignments(args.set)}
    base["calibration"] = CalibrationConfig.model_validate(cal)
    if "model" not in base:
        raise api.ConfigError("--model is required (or 'model:' in --config)")
    return RunConfig.model_validate(base)


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
    if args.evaluator == "perplexity":
        options.setdefault("data", _data_spec(args.data, args.data_part, args.data_dataset,
                                              args.data_field))
        options.setdefault("seq_len", args.seq_len)
        options.setdefault("windows", args.windows)
        if args.stride is not None:
            options.setdefault("stride", args.stride)
        options.setdefault("batch_size", args.batch_size)
        options.setdefault("progress", not args.json)
    api.build_evaluator(args.evaluator, options)  # validate before loading the model
    model, tokenizer, meta = api.load_model(args.model)
    if tokenizer is None:
        raise api.ConfigError(f"{args.model} has no tokenizer files")
    t0 = time.perf_counter()
    result = api.evaluate(model, tokenizer, args.evaluator, options, backend=args.backend)
    payload = {"model": args.model, "evaluator": result.evaluator, **result.metrics,
               "seconds": round(time.perf_counter() - t0, 2),
               "quantized": meta is not None, "details": result.details}
    if args.json:
        _print_json(payload)
    else:
        table = Table(title=f"{result.evaluator} of {args.model}")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for k, v in result.metrics.items():
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) and not v.is_integer()
                          else f"{v:g}")
        out.print(table)
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
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcore", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list-plugins", help="installed plugins and what they register")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_list_plugins)

    p = sub.add_parser("schemes", help="the scheme presets")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_schemes)

    p = sub.add_parser("quantize", help="quantize a model layer by layer")
    p.add_argument("--config", help="YAML/JSON run configuration; flags override it")
    p.add_argument("--model", help="HF folder, hub id, .gguf file, or 'smollm2'")
    p.add_argument("--method", help="quantizer name (see list-plugins)")
    p.add_argument("--scheme", help=f"preset: {', '.join(PRESETS)}")
    p.add_argument("--group-size", type=int, dest="group_size")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the method's config (repeatable)")
    p.add_argument("--calib", help="calibration source: a file, 'pydoc', or hf:NAME:SPLIT")
    _add_data_args(p, "calib", "all")
    p.add_argument("--samples", type=int)
    p.add_argument("--seq-len", type=int, dest="seq_len")
    p.add_argument("--sampling", choices=["consecutive", "random"])
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, dest="batch_size")
    p.add_argument("--backend")
    p.add_argument("--propagation", choices=["quantized", "full"])
    p.add_argument("--error-windows", type=int, dest="error_windows",
                   help="calibration windows each layer's relative MSE is measured on "
                        "(default 4)")
    p.add_argument("--save", help="output folder (written atomically)")
    p.add_argument("--format")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("evaluate", help="evaluate a float or saved quantized model")
    p.add_argument("--model", required=True)
    p.add_argument("--evaluator", default="perplexity")
    p.add_argument("--data", default="pydoc")
    _add_data_args(p, "data", "all")
    p.add_argument("--seq-len", type=int, default=512, dest="seq_len")
    p.add_argument("--windows", type=int, default=None)
    p.add_argument("--stride", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=4, dest="batch_size")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a field of the evaluator's config (repeatable)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("demo", help="SmolLM2-135M: full precision vs RTN W4A16 g64 (offline)")
    p.add_argument("--data", default="pydoc")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512, dest="seq_len")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--save", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (api.ConfigError, PluginError, FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
