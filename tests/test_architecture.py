"""The import walls hold, and they catch a plugin that imports the engine (planted in a copy
of the source tree, so the repository itself is never touched)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")


def _tree(tmp_path: Path) -> Path:
    """Every top-level package under its import name: links to the real folders, except
    qcore_rtn, a copy that can be planted into."""
    site = tmp_path / "site"
    site.mkdir()
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for name, folder in package_dir.items():
        if name == "qcore_rtn":
            shutil.copytree(ROOT / folder, site / name)
        elif "." not in name:
            (site / name).symlink_to(ROOT / folder, target_is_directory=True)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return site


def _lint(tmp_path: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([str(LINT), "--config", str(tmp_path / "pyproject.toml"),
                           "--no-cache"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")
@pytest.mark.parametrize("planted, contract", [
    ("from qcore.engine.pipeline import run_layerwise\n",
     "plugins and backends use the contracts, never the engine, the API or the CLI"),
    ("from qcore import api\n",
     "plugins and backends use the contracts, never the engine, the API or the CLI"),
    ("import qcore_gptq.solve\n", "no plugin imports another plugin"),
])
def test_a_plugin_reaching_past_the_contracts_breaks_a_named_contract(tmp_path, planted,
                                                                       contract):
    site = _tree(tmp_path)
    assert _lint(tmp_path, site).returncode == 0  # the copy as it is keeps every contract
    (site / "qcore_rtn" / "planted.py").write_text(planted)
    result = _lint(tmp_path, site)
    assert result.returncode != 0
    assert f"{contract} BROKEN" in result.stdout
    assert "qcore_rtn.planted" in result.stdout


def _functions(folders: list[str]):
    import ast

    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    yield path.relative_to(ROOT), node


def test_no_function_a_reader_has_to_scroll():
    """At most 80 lines and 8 parameters (self/cls not counted) in the core and plugins."""
    too_long = []
    for path, fn in _functions(["core", "plugins", "backends"]):
        a = fn.args
        params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, [a.vararg, a.kwarg])]
        if a.args and a.args[0].arg in ("self", "cls"):
            params = params[1:]
        lines = fn.end_lineno - fn.lineno + 1
        if lines > 80 or len(params) > 8:
            too_long.append(f"{path}:{fn.lineno} {fn.name}: {lines} lines, {len(params)} "
                            "parameters")
    assert not too_long, "\n".join(too_long)


def test_the_core_stays_small_enough_to_read_in_an_afternoon():
    lines = sum(len(p.read_text(encoding="utf-8").splitlines())
                for p in (ROOT / "core").rglob("*.py"))
    assert lines <= 5000, f"core/ holds {lines} lines of Python"
