import json

import pytest

from qcore.cli import main


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_model

    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("\n\n".join(["Some calibration prose about code."] * 400))
    return tmp_path


def test_quantize_then_evaluate_saved_model(tiny_folder, capsys):
    out = tiny_folder / "q"
    rc = main(["quantize", "--model", str(tiny_folder / "tiny"), "--method", "rtn",
               "--scheme", "W4A16", "--group-size", "32", "--calib",
               str(tiny_folder / "calib.txt"), "--samples", "4", "--seq-len", "32",
               "--batch-size", "1", "--error-windows", "2", "--save", str(out), "--json"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"] == "rtn" and summary["saved"] == str(out)
    assert len(summary["layers"]) == 2 and summary["layers"][0]["relative_mse"] > 0
    assert summary["layers"][0]["error_windows"] == 2
    meta = json.loads((out / "qcore.json").read_text())
    assert meta["run"]["calibration"]["samples"] == 4 and meta["run"]["group_size"] == 32
    assert meta["run"]["error_windows"] == 2

    rc = main(["evaluate", "--model", str(out), "--data", str(tiny_folder / "calib.txt"),
               "--seq-len", "32", "--windows", "3", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result["quantized"] is True and result["windows"] == 3
    assert result["tokens_scored"] == 3 * 31 and result["perplexity"] > 1


def test_quantize_from_yaml_config_with_overrides(tiny_folder, capsys):
    cfg = tiny_folder / "run.yaml"
    cfg.write_text(f"model: {tiny_folder / 'tiny'}\nmethod: rtn\nscheme: W8A16\n"
                   "calibration:\n  data: {source: pydoc, part: head}\n  samples: 2\n"
                   "  seq_len: 16\n")
    assert main(["quantize", "--config", str(cfg), "--set", "skip=[mlp.down_proj]",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scheme"] == "W8A16"


@pytest.mark.parametrize("extra, fragment", [
    (["--group-size", "128"], "group_size 128 does not divide"),
    (["--set", "colour=red"], "colour"),
    (["--method", "nope"], "no quantizer named 'nope'"),
    (["--scheme", "W5A5"], "unknown scheme"),
    (["--calib", "missing.txt"], "missing.txt"),
    (["--samples", "0"], "samples"),
])
def test_bad_input_fails_up_front_with_the_field(tiny_folder, capsys, extra, fragment):
    args = ["quantize", "--model", str(tiny_folder / "tiny"), "--method", "rtn", "--scheme",
            "W4A16", "--group-size", "32", "--calib", "pydoc", "--samples", "2",
            "--seq-len", "16"]
    rc = main(args + extra)
    assert rc == 2
    assert fragment in capsys.readouterr().err.replace("\n", " ")


def test_schemes_command(capsys):
    assert main(["schemes", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["W4A4KV4"]["kv_cache"]["bits"] == 4
