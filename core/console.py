"""What commands (the core's, or a plugin's through ``qcore_register_commands``) and
evaluators print with: rich consoles for stderr and stdout, progress (:class:`Steps`: a live
bar on a terminal, else one line per step), strict JSON, uncut tables, numbers, and the help
formatter every qcore subcommand uses."""

from __future__ import annotations

import argparse
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
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
    run longer instead. Columns named in ``left`` (all when None) align left."""
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


def flagify(text: str, flags: dict[str, str]) -> str:
    """```field``` references in a message as the flags that set them (``flags``, else
    ``--field-name``)."""
    return re.sub(r"`(\w+)`", lambda m: flags.get(m[1], "--" + m[1].replace("_", "-")), text)


def live() -> bool:
    """Whether stderr is a terminal (where a bar can redraw itself)."""
    return Console(stderr=True).is_terminal


def duration(seconds: float) -> str:
    """``42 s``, ``7 min``, ``2.5 h``: how long, to a reader's precision."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Steps:
    """``total`` units of work. ``show``: True on a terminal shows a live bar (with elapsed
    time and the time left) and elsewhere one line per :meth:`advance`; False shows
    nothing; None (the default) shows the bar on a terminal and nothing elsewhere."""

    def __init__(self, description: str, total: int, show: bool | None = None) -> None:
        self.description, self.total, self.done, self.resumed = description, total, 0, 0
        terminal = live()
        self.lines = bool(show) and not terminal
        self.started = time.perf_counter()
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                   TextColumn("{task.fields[info]}"))
        self.bar = Progress(*columns, console=Console(stderr=True),
                            disable=not (terminal and show is not False))
        self.task = self.bar.add_task(description, total=total, info="")

    def __enter__(self) -> Steps:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.bar.__exit__(*exc)

    def skip(self, n: int) -> None:
        """Count ``n`` units an earlier run did (a resume): they do not speed up the
        estimate of the time left."""
        self.done += n
        self.resumed += n
        self.bar.update(self.task, advance=n)

    def advance(self, n: int = 1, info: str = "") -> None:
        self.done += n
        self.bar.update(self.task, advance=n, info=info)
        if self.lines:
            left = self.left()
            eta = "" if left is None or self.done >= self.total else f" (~{duration(left)} left)"
            print(f"[{self.done}/{self.total}] {info or self.description}{eta}", file=sys.stderr,
                  flush=True)

    def say(self, text: str) -> None:
        """A message above the live bar, or a line of its own (when shown at all)."""
        if not self.bar.disable:
            self.bar.console.print(text, markup=False, highlight=False)
        elif self.lines:
            print(text, file=sys.stderr, flush=True)

    def left(self) -> float | None:
        """Seconds left at this run's pace so far (None before the first unit)."""
        ran = self.done - self.resumed
        if ran <= 0:
            return None
        return (time.perf_counter() - self.started) / ran * (self.total - self.done)
