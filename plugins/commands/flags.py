"""Command-line flags generated from a pydantic config's field metadata (``flag(...)`` in
:mod:`qcore.config`): a new :class:`~qcore.config.RunConfig` field is one edit, and its
flag, type, choices, help and shown default follow from it. The parser records each
field's flag, so that the CLI names flags where the library names fields."""

from __future__ import annotations

import argparse
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from qcore.config import ADVANCED, DATA, METHOD, OUTPUT
from qcore.console import flagify
from qcore.interfaces import DataSpec

GROUPS = (DATA, METHOD, OUTPUT, ADVANCED)
PREFIX = "cfg."  # argparse dest of a generated flag: PREFIX + the field's dotted path


def config_fields(model: type[BaseModel], path: tuple[str, ...] = ()
                  ) -> Iterator[tuple[tuple[str, ...], FieldInfo, dict[str, Any]]]:
    """(dotted path, field, cli metadata) of every field that has a flag, nested configs
    walked into."""
    for name, info in model.model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        cli = extra.get("cli")
        if cli is not None:
            yield (*path, name), info, cli
        elif isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            yield from config_fields(info.annotation, (*path, name))


def flag_name(path: tuple[str, ...], cli: dict[str, Any]) -> str:
    return "--" + (cli.get("name") or path[-1].replace("_", "-"))


def field_flags(model: type[BaseModel]) -> dict[str, str]:
    """Field name -> its flag, for :func:`flagify`."""
    return {path[-1]: flag_name(path, cli) for path, _, cli in config_fields(model)}


def _value_type(annotation: Any) -> tuple[Any, tuple[Any, ...] | None]:
    """(type, choices) of a field's annotation, without its None option."""
    if get_origin(annotation) in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        annotation = options[0] if options else str
    if get_origin(annotation) is Literal:
        return str, get_args(annotation)
    return (annotation if annotation in (int, float, bool) else str), None


def _help(info: FieldInfo, cli: dict[str, Any], flags: dict[str, str]) -> str:
    text = flagify(cli["help"], flags)
    shown = cli.get("shown_default")
    if shown is None and info.annotation is not bool and not info.is_required():
        default = info.get_default(call_default_factory=True)
        shown = "all" if default is None else default
    return text if shown is None or info.annotation is bool else f"{text} (default: {shown})"


def add_data_flags(p: argparse._ActionsContainer, prefix: str, default_part: str = "all",
                   dest: str = "") -> None:
    """The three flags that complete a text source (``--PREFIX-part``, ``-dataset``,
    ``-field``), the fields of :class:`~qcore.interfaces.DataSpec` other than its source."""
    dest = dest or prefix
    p.add_argument(f"--{prefix}-part", choices=get_args(DataSpec.model_fields["part"].annotation),
                   default=default_part, dest=f"{dest}_part",
                   help="use the whole text, or its first/second half split at an article "
                        "boundary near the middle")
    p.add_argument(f"--{prefix}-dataset", default=None, metavar="NAME", dest=f"{dest}_dataset",
                   help="dataset plugin that reads the source (default: detected from it: "
                        ".txt/.md text, .jsonl, pydoc, hf:NAME:SPLIT)")
    p.add_argument(f"--{prefix}-field", default=None, metavar="FIELD", dest=f"{dest}_field",
                   help="text field of JSONL/HF records (default: 'text', or question + answer)")


def add_config_flags(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    """One flag per field of ``model`` with cli metadata, in argument groups; every flag
    defaults to unset, so that values from ``--config`` stand unless a flag is given."""
    flags = field_flags(model)
    parser.set_defaults(field_flags=flags)  # for qcore.cli's error messages
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for path, info, cli in config_fields(model):
        group = groups[cli["group"]]
        kwargs: dict[str, Any] = {"dest": PREFIX + ".".join(path), "default": None,
                                  "help": _help(info, cli, flags)}
        if info.annotation is DataSpec:
            group.add_argument(flag_name(path, cli), metavar=cli["metavar"], **kwargs)
            add_data_flags(group, cli["name"], dest="_" + PREFIX + ".".join(path))
            continue
        value_type, choices = _value_type(info.annotation)
        if value_type is bool:  # a flag that flips the default
            kwargs["action"] = "store_false" if info.default else "store_true"
        elif info.annotation == dict[str, Any]:  # KEY=VALUE assignments
            kwargs.update(action="append", metavar=cli["metavar"])
        else:
            kwargs.update(type=value_type, choices=choices,
                          metavar=None if choices else cli["metavar"] or path[-1].upper())
        group.add_argument(flag_name(path, cli), **kwargs)


def config_updates(args: argparse.Namespace) -> dict[str, Any]:
    """The generated flags the user gave, as a nested mapping of config fields (a text
    source as a :class:`DataSpec` built from its flag and its three companions)."""
    updates: dict[str, Any] = {}
    values = vars(args)
    for dest, value in values.items():
        if not dest.startswith(PREFIX) or value is None:
            continue
        *parents, leaf = dest[len(PREFIX):].split(".")
        node = updates
        for parent in parents:
            node = node.setdefault(parent, {})
        companion = "_" + dest
        if companion + "_part" in values:  # a text source
            value = DataSpec(source=value, part=values[companion + "_part"],
                             dataset=values[companion + "_dataset"],
                             field=values[companion + "_field"])
        node[leaf] = value
    return updates
