"""The wheel installs and works; a third-party plugin installed with pip is found by name."""

import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
                   check=True, capture_output=True, text=True)


def _run(code: str, path: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(path), **(env_extra or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def wheel_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(ROOT))
    (wheel,) = (tmp / "dist").glob("qcore-*.whl")
    target = tmp / "site"
    _pip("install", "--no-deps", "--target", str(target), str(wheel))
    return wheel, target


def test_wheel_contains_every_package_and_the_entry_points(wheel_install):
    wheel, _ = wheel_install
    names = set(zipfile.ZipFile(wheel).namelist())
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"]
    for name, folder in package_dir.items():  # every module of every package, subpackages too
        for module in (ROOT / folder).rglob("*.py"):
            rel = module.relative_to(ROOT / folder).as_posix()
            assert f"{name.replace('.', '/')}/{rel}" in names, f"{folder}/{rel} not in the wheel"
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA")))
    plain = [line.split(":", 1)[1].strip() for line in metadata.decode().splitlines()
             if line.startswith("Requires-Dist:") and "extra ==" not in line]
    # a plain install plots the study and checks reasoning answers
    assert any(r.startswith("matplotlib") for r in plain)
    assert any(r.startswith("math-verify") for r in plain)
    eps = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(eps).decode()
    assert "[qcore]" in text and "rtn = qcore_rtn.plugin" in text


def test_installed_wheel_runs_from_its_own_files(wheel_install):
    _, target = wheel_install
    proc = _run("""
        import json, qcore, qcore_rtn
        from qcore.plugins import PluginManager
        pm = PluginManager()
        print(json.dumps({"qcore": qcore.__file__, "rtn": qcore_rtn.__file__,
                          "quantizers": sorted(pm.registry("quantizer"))}))
    """, target)
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    assert data["qcore"].startswith(str(target)) and data["rtn"].startswith(str(target))
    assert "rtn" in data["quantizers"]


def test_third_party_plugin_installed_with_pip_is_listed_and_used(tmp_path):
    target = tmp_path / "site"
    _pip("install", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(ROOT / "examples" / "qcore-example-plugin"))
    listing = subprocess.run([sys.executable, "-m", "qcore.cli", "list-plugins", "--json"],
                             env={**os.environ, "PYTHONPATH": str(target)},
                             capture_output=True, text=True, timeout=120)
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)["registrations"]
    mine = {(r["kind"], r["name"]): r for r in rows if r["plugin"] == "example"}
    assert set(mine) == {("quantizer", "clipped-rtn"), ("solver", "clipped-rtn"),
                         ("architecture", "granite"), ("evaluator", "token-accuracy")}
    row = mine[("quantizer", "clipped-rtn")]
    assert row["distribution"] == "qcore-example-plugin" and row["version"] == "0.2.0"
    assert "qcore_layer_quantized" in row["hooks"]

    log = tmp_path / "layers.jsonl"
    proc = _run(f"""
        import sys, json
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        from conftest import make_tiny_model
        from qcore import api
        from qcore.config import RunConfig, CalibrationConfig
        from qcore.interfaces import DataSpec
        from tokenizers import Tokenizer
        tok = __import__("transformers").PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer.from_str(open({str(tmp_path / 'tok.json')!r}).read()))
        cfg = RunConfig(model="tiny", method="clipped-rtn", scheme="W4A16", group_size=32,
                        method_config={{"clip_ratio": 0.8}},
                        calibration=CalibrationConfig(data=DataSpec(source="pydoc"),
                                                      samples=2, seq_len=32))
        res = api.quantize(cfg, model=make_tiny_model("llama"), tokenizer=tok, progress=False)
        acc = api.evaluate(res.model, tok, "token-accuracy",
                           {{"data": {{"source": "pydoc"}}, "seq_len": 32, "windows": 2}})
        # the third-party solver composed with a built-in transforming method
        sq = cfg.model_copy(update={{"method": "smoothquant", "scheme": "W8A8", "group_size": None,
                                    "method_config": {{"weight_method": "clipped-rtn",
                                                      "weight_options": {{"clip_ratio": 0.9}}}}}})
        smooth = api.quantize(sq, model=make_tiny_model("llama"), tokenizer=tok,
                              progress=False)
        print(json.dumps({{"stats": res.report.layers[0].stats, **acc.metrics,
                          "sq_stats": smooth.report.layers[0].stats}}))
    """, target, {"QCORE_EXAMPLE_LOG": str(log)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["stats"] == {"clip_ratio": 0.8} and 0 <= out["accuracy"] <= 1
    assert out["tokens"] == 2 * 31
    assert out["sq_stats"]["clipped-rtn.mlp.down_proj.clip_ratio"] == 0.9
    events = [json.loads(line) for line in log.read_text().splitlines()]
    layers = [e for e in events if "index" in e]
    assert [e["index"] for e in layers] == [0, 1, 0, 1]  # both runs
    assert layers[0]["method"] == "clipped-rtn" and layers[2]["method"] == "smoothquant"
    done = [e for e in events if e.get("event") == "model_quantized"]
    assert [e["method"] for e in done] == ["clipped-rtn", "smoothquant"]
    assert all(isinstance(e["jumps"], list) for e in done)

    # the plugin's own subcommand
    from conftest import make_tiny_model
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    make_tiny_model("llama").save_pretrained(tmp_path / "tiny")
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(
        (tmp_path / "tok.json").read_text())).save_pretrained(tmp_path / "tiny")
    cmd = subprocess.run([sys.executable, "-m", "qcore.cli", "token-count", "--model",
                          str(tmp_path / "tiny"), "--data", "pydoc", "--part", "head"],
                         env={**os.environ, "PYTHONPATH": str(target)},
                         capture_output=True, text=True, timeout=120)
    assert cmd.returncode == 0, cmd.stderr
    assert json.loads(cmd.stdout)["tokens"] > 1000


@pytest.fixture(autouse=True)
def _tokenizer_file(tmp_path, tiny_tokenizer):
    (tmp_path / "tok.json").write_text(tiny_tokenizer.backend_tokenizer.to_str())
