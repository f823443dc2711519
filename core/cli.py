"""The qcore command line: the host of every command, and the ones that belong to the core
(quantize, list-plugins, schemes). Plugins add theirs (evaluate, export, demo, study) through
the qcore_register_commands hook; errors are one line, naming the flags."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError
from rich.markup import escape
from rich.table import Table

from qcore import api
from qcore.cliargs import add_config_flags, config_updates, field_flags, flagify
from qcore.config import CalibrationConfig, RunConfig, parse_assignments, validation_summary
from qcore.console import HelpFormatter, add_command, console, out, print_json, print_uncut
from qcore.errors import QcoreError
from qcore.plugins import PluginError, get_plugin_manager
from qcore.schemes import PRESETS

#: config field -> the flag that sets it, for errors and help that name fields
FLAGS = {**field_flags(RunConfig), "out": "--out"}


# ----------------------------------------------------------------------------- list-plugins
def cmd_list_plugins(args: argparse.Namespace) -> int:
    listing = get_plugin_manager().listing()
    if args.json:
        print_json(listing)
        return 0
    rows = sorted(listing["registrations"], key=lambda r: (r["kind"], r["name"]))
    columns = ("kind", "name", "plugin", "version", "module", "distribution")
    cells = [[r[c] or "-" for c in columns] for r in rows]
    print_uncut("qcore plugins", columns, cells)
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
        print_json(data)
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
    """``--config`` (if any) with the flags given on top of it."""
    base: dict[str, Any] = {}
    if args.config:
        base = RunConfig.from_file(args.config).model_dump(exclude_unset=True)
    updates = config_updates(args)
    if "method_config" in updates:
        updates["method_config"] = {**base.get("method_config", {}),
                                    **parse_assignments(updates["method_config"])}
    calibration = {**base.get("calibration", {}), **updates.pop("calibration", {})}
    base.update(updates)
    if "model" not in base:
        raise api.ConfigError("`model` is required (or 'model:' in --config)")
    try:
        base["calibration"] = CalibrationConfig.model_validate(calibration)
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
        print_json(summary)
    else:
        out.print(_layer_table(report))
        out.print(f"quantized with {report.method} in {report.seconds:.1f}s, peak RSS "
                  f"{report.peak_rss_mb:.0f} MB" + (f"; saved to {result.saved}"
                                                    if result.saved else ""))
    return 0


# ----------------------------------------------------------------------------- parser
def _add_list_plugins(sub: Any) -> None:
    p = add_command(sub, "list-plugins", "installed plugins, what they register, and any left out")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_list_plugins)


def _add_schemes(sub: Any) -> None:
    p = add_command(sub, "schemes", "the scheme presets")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_schemes)


def _add_quantize(sub: Any) -> None:
    p = add_command(sub, "quantize", "quantize a model layer by layer (and save it)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML/JSON run configuration; flags override its values")
    add_config_flags(p, RunConfig, FLAGS)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or per-layer lines when stderr is not a terminal)")
    p.set_defaults(func=cmd_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qcore", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (_add_list_plugins, _add_schemes, _add_quantize):
        add(sub)
    get_plugin_manager().call_isolated("qcore_register_commands", subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (QcoreError, PluginError, OSError, ValueError) as exc:
        message = flagify(" ".join(str(exc).split()), FLAGS) or type(exc).__name__
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False,
                      soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
