"""Every command in the README and docs/ works as written: each `qcore ...` line of a
```bash block parses, and is validated the way the command validates before it loads a
model (method, scheme, options, data, evaluator, format, grid); the quick ones run; each
`python benchmarks/...` or `python scripts/...` line parses with its script's own parser."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from qcore.cli import build_parser, main
from qcore.plugins import get_plugin_manager
from qcore_commands.core_commands import _run_config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BLOCK = re.compile(r"```bash\n(.*?)```", re.S)


def doc_commands() -> list[tuple[str, list[str]]]:
    """(where, argv) of every command line in a bash block of the docs."""
    found = []
    for doc in DOCS:
        text = doc.read_text(encoding="utf-8")
        for block in BLOCK.finditer(text):
            line_no = text[:block.start()].count("\n") + 2
            for line in block.group(1).replace("\\\n", " ").splitlines():
                argv = shlex.split(line, comments=True)
                if argv and (argv[0].endswith("qcore") or argv[0] == "python"):
                    found.append((f"{doc.relative_to(ROOT)}:{line_no}", argv))
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_a_user_types():
    assert len(COMMANDS) > 40
    quantized = {a[a.index("--method") + 1] for _, a in COMMANDS if "quantize" in a
                 and "--method" in a}
    assert quantized >= {"rtn", "gptq", "awq", "smoothquant", "flatquant"}


def _validate_quantize(args) -> None:
    plugins = get_plugin_manager()
    config = _run_config(args)
    scheme = config.scheme or plugins.default_scheme(config.method)
    config = config.model_copy(update={"scheme": scheme})
    plugins.build_quantizer(config.method, config.resolved_scheme(), config.method_config)
    plugins.get("format", config.format)
    data = config.calibration.data
    from qcore import api

    api.datasets(plugins).resolve(data).check(data)


def _validate(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "quantize":
        _validate_quantize(args)
    elif args.command == "evaluate":
        from qcore_commands.commands import evaluation_options

        evaluation_options(args)
    elif args.command == "export":
        get_plugin_manager().get("format", args.format)
    elif args.command == "study" and args.grid:
        from qcore_study.grid import StudyGrid

        StudyGrid.from_file(ROOT / args.grid)


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if c[1][0].endswith("qcore")],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_a_qcore_command_in_the_docs_is_valid(where, argv, monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository
    try:
        _validate(argv[1:])
    except SystemExit as exc:  # argparse refused it
        pytest.fail(f"{where}: {shlex.join(argv)}: exit {exc.code}")


@pytest.mark.parametrize("argv", [["schemes", "--json"], ["list-plugins", "--json"]])
def test_the_quick_commands_run(argv, capsys):
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)


PARSE_ONLY = """
import argparse, runpy, sys
parse = argparse.ArgumentParser.parse_args
def parse_and_stop(self, *args, **kwargs):
    parse(self, *args, **kwargs)
    print("parsed")
    sys.exit(0)
argparse.ArgumentParser.parse_args = parse_and_stop
sys.argv = sys.argv[1:]
sys.path.insert(0, sys.argv[0].rsplit("/", 1)[0])  # as `python SCRIPT` puts its folder first
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("where, argv", [c for c in COMMANDS if c[1][0] == "python"],
                         ids=lambda v: v if isinstance(v, str) else None)
def test_a_script_command_in_the_docs_parses(where, argv):
    script = ROOT / argv[1]
    assert script.is_file(), f"{where}: {argv[1]} does not exist"
    proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, str(script), *argv[2:]],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "parsed" in proc.stdout, \
        f"{where}: {shlex.join(argv)}\n{proc.stderr[-1500:]}"
