"""What a command (the core's or a plugin's, added through ``qcore_register_commands``)
prints with: rich consoles for stderr and stdout, strict JSON, uncut tables, numbers, and
the help formatter every qcore subcommand uses."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from qcore.io import dumps_json

console = Console(stderr=True)
out = Console()


def print_json(data: Any) -> None:
    """Strict JSON on stdout: NaN/infinity become null (bare NaN is not JSON)."""
    print(dumps_json(data, indent=2))


def print_uncut(title: str, header: Sequence[str], cells: list[list[str]],
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


def fmt(value: Any, sign: bool = False) -> str:
    """A metric for a table cell: 4 significant digits, ``-`` for none."""
    if value is None:
        return "-"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:+.4g}" if sign else f"{value:.4g}"
    return f"{value:+g}" if sign else f"{value:g}"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` for options with a real default, nothing for unset ones."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default:" in text:
            return text
        return super()._get_help_string(action)


def add_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A ``qcore NAME`` subcommand on argparse's ``sub`` (what ``qcore_register_commands``
    receives)."""
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
