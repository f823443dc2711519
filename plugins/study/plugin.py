"""Registers the ``qcore study`` subcommand with qcore."""

from qcore.hookspecs import hookimpl
from qcore_study.command import add_parser


@hookimpl
def qcore_register_commands(subparsers):
    add_parser(subparsers)
