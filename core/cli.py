"""The qcore command line: the host of every command. Each command is a plugin's, added
through the ``qcore_register_commands`` hook (the built-in ones by ``qcore_commands``);
the host parses, dispatches and turns a deliberate error into one line, naming flags where
the library names config fields (```group_size``` -> ``--group-size``)."""

from __future__ import annotations

import argparse
import logging
import sys

from rich.markup import escape

from qcore.console import HelpFormatter, console, flagify
from qcore.errors import QcoreError
from qcore.plugins import PluginError, get_plugin_manager


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qcore", formatter_class=HelpFormatter, description="post-training quantization of "
        "decoder-only LLMs; every command comes from a plugin (qcore list-plugins lists them)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", required=True)
    get_plugin_manager().call_isolated("qcore_register_commands", subparsers=sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (QcoreError, PluginError, OSError, ValueError) as exc:
        flags = getattr(args, "field_flags", {})
        message = flagify(" ".join(str(exc).split()), flags) or type(exc).__name__
        console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
