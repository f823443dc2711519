"""The core's own commands: ``qcore quantize`` (its flags generated from RunConfig),
``qcore list-plugins`` and ``qcore schemes``."""

from __future__ import annotations

import argparse
from typing import Any

from pydantic import ValidationError
from rich.table import Table

from qcore import api
from qcore.config import (
    CalibrationConfig,
    RunConfig,
    parse_assignments,
    validation_summary,
)
from qcore.console import add_command, out, print_json, print_uncut
from qcore.plugins import get_plugin_manager
from qcore.schemes import PRESETS
from qcore_commands.flags import add_config_flags, config_updates


def cmd_list_plugins(args: argparse.Namespace) -> int:
    listing = get_plugin_manager().listing()
    if args.json:
        print_json(listing)
        return 0
    rows = sorted(listing["registrations"], key=lambda r: (r["kind"], r["name"]))
    columns = ("kind", "name", "default scheme", "plugin", "version", "module",
               "distribution")
    cells = [[r.get(c.replace(" ", "_")) or "-" for c in columns] for r in rows]
    listed = {r["plugin"] for r in rows}
    cells += [["hooks only", ", ".join(h.removeprefix("qcore_") for h in p["hooks"]) or "-",
               "-", p["name"], p["version"] or "-", p["module"], p["distribution"] or "-"]
              for p in listing["plugins"] if p["name"] not in listed]
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


def cmd_quantize(args: argparse.Namespace) -> int:
    config = _run_config(args)
    result = api.quantize(config, progress=not args.json and not args.no_progress)
    report, layers = result.report, result.report.layers
    if args.json:
        print_json({"method": report.method, "scheme": result.config.resolved_scheme().name,
                    "seconds": round(report.seconds, 2),
                    "peak_rss_mb": round(report.peak_rss_mb, 1),
                    "mean_relative_mse": sum(x.relative_mse for x in layers) / len(layers),
                    "saved": str(result.saved) if result.saved else None,
                    "layers": [x.model_dump() for x in layers]})
        return 0
    table = Table(title=f"{report.method}: per-layer reconstruction")
    table.add_column("layer")
    windows = layers[0].error_windows if layers else 0
    table.add_column(f"relative MSE ({windows} windows)", justify="right")
    table.add_column("seconds", justify="right")
    for layer in layers:
        table.add_row(layer.name, f"{layer.relative_mse:.3e}", f"{layer.seconds:.2f}")
    out.print(table)
    saved = f"; saved to {result.saved}" if result.saved else ""
    out.print(f"quantized with {report.method} in {report.seconds:.1f}s, peak RSS "
              f"{report.peak_rss_mb:.0f} MB{saved}")
    return 0


def _method_defaults_in_help(p: argparse.ArgumentParser) -> None:
    """--scheme's help names each registered method's default scheme; --method's says
    which methods take long at their full defaults."""
    plugins = get_plugin_manager()
    for action in p._actions:
        if action.dest == "cfg.scheme":
            action.help = action.help.replace("(default: the method's)", "(default: the "
                                              "method's: " + ", ".join(
                f"{n} {plugins.default_scheme(n)}" for n in plugins.registry("quantizer"))
                + ")")
        elif action.dest == "cfg.method":
            action.help = action.help.replace(" (default:", (
                "; awq and flatquant at their full defaults (128 x 512 calibration, "
                "FlatQuant's 15 training epochs) run for an hour or more on a 2-core CPU: "
                "try --samples 4 first (default:"))


def add_core_commands(sub: Any) -> None:
    for name, about, func in (
            ("list-plugins", "installed plugins, what they register, and any left out",
             cmd_list_plugins),
            ("schemes", "the scheme presets", cmd_schemes)):
        p = add_command(sub, name, about)
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")
        p.set_defaults(func=func)
    p = add_command(sub, "quantize", "quantize a model layer by layer (and save it)")
    p.add_argument("--config", metavar="FILE",
                   help="YAML/JSON run configuration; flags override its values")
    add_config_flags(p, RunConfig)
    _method_defaults_in_help(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bar (or per-layer lines when stderr is not a terminal)")
    p.set_defaults(func=cmd_quantize)
