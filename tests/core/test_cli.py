import json

import pytest
from conftest import rtn_args

from qcore.cli import main


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
    (["--group-size", "128"], "--group-size 128 does not divide"),
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


# ----------------------------------------------------------------------------- bad input
def _fails_with(args, capsys, *fragments):
    assert main(args) == 2
    err = " ".join(capsys.readouterr().err.split())
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if the float model is loaded: the error must come before."""
    from qcore import api

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(api, "load_model", never)


def test_nonexistent_model_path_is_not_reported_as_a_hub_id(tiny_folder, capsys):
    for missing in (str(tiny_folder / "nope"), "./nope", "models/a/b", "nope.gguf"):
        err = _fails_with(["evaluate", "--model", missing], capsys, "no such file or folder")
        assert "hub" not in err


def test_corrupt_config_json_names_the_line(tiny_folder, capsys, no_model_load):
    config = tiny_folder / "tiny" / "config.json"
    config.write_text(config.read_text().replace('"model_type"', '"model_type" "', 1))
    _fails_with(rtn_args(tiny_folder), capsys, "config.json line", "not valid JSON")


def test_truncated_gguf_is_named(tmp_path, capsys):
    from qcore.engine.loading import smollm2_gguf

    try:
        data = smollm2_gguf().read_bytes()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    for size in (1000, len(data) // 2):
        (tmp_path / "cut.gguf").write_bytes(data[:size])
        _fails_with(["evaluate", "--model", str(tmp_path / "cut.gguf")], capsys,
                    f"GGUF file {tmp_path / 'cut.gguf'}", "truncated")


@pytest.mark.parametrize("value", ["skip=[mlp.down_proj", "skip={a: [}"])
def test_malformed_yaml_in_set_names_the_option(tiny_folder, capsys, value):
    _fails_with(rtn_args(tiny_folder, "--set", value), capsys, f"--set '{value}'",
                "not valid YAML")


def test_malformed_config_file_names_the_line(tiny_folder, capsys):
    cfg = tiny_folder / "run.yaml"
    cfg.write_text("model: m\nmethod: rtn\ncalibration: {samples: [1\n")
    _fails_with(["quantize", "--config", str(cfg)], capsys, "run.yaml: not valid YAML",
                "line 4")
    cfg.write_text("model: m\nmethd: rtn\n")
    _fails_with(["quantize", "--config", str(cfg)], capsys, "methd: unknown field")


@pytest.mark.parametrize("content, fragments", [
    ('{"text": "a"}\n{"body": "b"}\n', ["calib.jsonl:2: no 'text' field (fields: body)"]),
    ('{"text": "a"}\n\n{"text": "b",}\n', ["calib.jsonl:3: not valid JSON"]),
    ("", ["calib.jsonl: no records"]),
], ids=["missing-field", "malformed-line", "empty"])
def test_jsonl_problems_name_file_and_line(tiny_folder, capsys, no_model_load, content,
                                           fragments):
    (tiny_folder / "calib.jsonl").write_text(content)
    args = rtn_args(tiny_folder)
    args[args.index("--calib") + 1] = str(tiny_folder / "calib.jsonl")
    _fails_with(args, capsys, *fragments)


def test_non_utf8_calibration_file_names_file_and_line(tiny_folder, capsys, no_model_load):
    (tiny_folder / "calib.txt").write_bytes(b"fine line\nsecond\nbad \xff byte\n")
    _fails_with(rtn_args(tiny_folder), capsys, "calib.txt:3: not UTF-8 text (byte 0xff")


def test_too_short_calibration_text_fails_before_the_model_loads(tiny_folder, capsys,
                                                                 no_model_load):
    (tiny_folder / "calib.txt").write_text("only a few words")
    _fails_with(rtn_args(tiny_folder), capsys, "calibration data", "samples=2 windows of "
                "seq_len=16 need 32 tokens")


def test_misspelt_layer_name_in_skip_is_refused(tiny_folder, capsys):
    _fails_with(rtn_args(tiny_folder, "--set", "skip=[mlp.dwn_proj]"), capsys,
                "rtn option skip: 'mlp.dwn_proj' is not a linear", "mlp.down_proj")
    _fails_with(rtn_args(tiny_folder, "--method", "smoothquant", "--scheme", "W8A8",
                         "--set", "skip=[q_prj]"), capsys,
                "smoothquant option skip: 'q_prj'")


def test_a_preset_group_size_that_does_not_fit_falls_back_with_a_notice(tiny_folder, capsys,
                                                                        caplog):
    args = rtn_args(tiny_folder, "--save", str(tiny_folder / "q"))
    i = args.index("--group-size")
    del args[i:i + 2]
    assert main(args) == 0
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 1, notices
    assert "W4A16 preset's group size 128 does not divide the input features of" in notices[0]
    assert "using 64, the largest power of two" in notices[0]
    saved = json.loads((tiny_folder / "q" / "qcore.json").read_text())
    assert saved["run"]["group_size"] == 64 and saved["scheme"]["weights"]["group_size"] == 64
    assert "using 64" in saved["report"]["notices"][0]
    # the same size given by hand is refused, naming the layers
    _fails_with(rtn_args(tiny_folder, "--group-size", "128"), capsys,
                "--group-size 128 does not divide the input features of", "(64)",
                "pass --group-size 64")


def test_each_method_runs_its_own_default_scheme(tiny_folder, capsys):
    for method, scheme in (("smoothquant", "W8A8"), ("flatquant", "W4A4"), ("gptq", "W4A16")):
        args = ["quantize", "--model", str(tiny_folder / "tiny"), "--method", method,
                "--calib", str(tiny_folder / "calib.txt"), "--samples", "2", "--seq-len", "16",
                "--no-progress", "--json", *(["--set", "epochs=0"] if method == "flatquant"
                                            else [])]
        assert main(args) == 0, capsys.readouterr().err
        assert json.loads(capsys.readouterr().out)["scheme"] == scheme, method


def test_every_option_has_help_and_shows_its_default(capsys):
    import argparse

    from qcore.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"{name} {action.option_strings} has no help"
        with pytest.raises(SystemExit):
            command.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        if name == "quantize":
            for shown in ("(default: rtn)", "smoothquant W8A8", "flatquant W4A4",
                          "rtn W4A16", "an hour or more", "model and data:", "method:",
                          "output:", "advanced:", "(default: 128)",
                          "(default: 512)", "(default: 4)", "(default: cpu)", "(default: qcore)",
                          "--overwrite"):
                assert shown in text, shown


def test_progress_is_one_line_per_layer_when_redirected(tiny_folder, capsys):
    args = [a for a in rtn_args(tiny_folder) if a != "--no-progress"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "[1/2] model.layers.0: relative MSE" in err and "[2/2] model.layers.1" in err


def test_export_command_writes_a_serving_format(tiny_folder, capsys):
    from conftest import rtn_args

    saved = tiny_folder / "q"
    assert main(rtn_args(tiny_folder, "--save", str(saved))) == 0
    capsys.readouterr()
    out = tiny_folder / "ct"
    assert main(["export", "--model", str(saved), "--format", "compressed-tensors",
                 "--out", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out"] == str(out) and summary["files"] == ["model.safetensors"]
    assert summary["ignore"] == ["lm_head"] and len(summary["layers"]) == 14
    assert {v["format"] for v in summary["layers"].values()} == {"pack-quantized"}
    # an existing output is refused without --overwrite, replaced with it
    assert main(["export", "--model", str(saved), "--format", "compressed-tensors",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--overwrite" in err and f"--out {out}" in err  # the export's own flag
    assert main(["export", "--model", str(saved), "--format", "ascendv1", "--out", str(out),
                 "--overwrite"]) == 0
    text = capsys.readouterr().out
    assert "14 linears W4A16: int4 asym g32" in text and (out /
                                                         "quant_model_description.json").exists()
    # the export evaluates like the saved model
    assert main(["evaluate", "--model", str(out), "--data", str(tiny_folder / "calib.txt"),
                 "--seq-len", "16", "--windows", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["quantized"] is True


def test_streaming_flags_reach_the_run(tiny_folder, capsys):
    out = tiny_folder / "q16"
    rc = main(rtn_args(tiny_folder, "--dtype", "bfloat16", "--max-shard-size", "20KB",
                       "--save", str(out), "--json"))
    assert rc == 0
    meta = json.loads((out / "qcore.json").read_text())
    assert meta["dtype"] == "bfloat16" and meta["run"]["max_shard_size"] == "20KB"
    assert (out / "model.safetensors.index.json").is_file()
    capsys.readouterr()
    rc = main(rtn_args(tiny_folder, "--no-stream", "--resume", "--save", str(tiny_folder / "x")))
    assert rc == 2 and "--resume continues a layer-by-layer save" in capsys.readouterr().err
    rc = main(rtn_args(tiny_folder, "--max-shard-size", "lots", "--save", str(tiny_folder / "y")))
    assert rc == 2 and "--max-shard-size 'lots'" in capsys.readouterr().err


def test_export_to_the_qcore_format_keeps_every_tensor_and_names_the_source(tiny_folder,
                                                                              capsys):
    from conftest import rtn_args

    saved = tiny_folder / "q"
    assert main(rtn_args(tiny_folder, "--save", str(saved))) == 0
    ct, again = tiny_folder / "ct", tiny_folder / "again"
    assert main(["export", "--model", str(saved), "--format", "compressed-tensors",
                 "--out", str(ct)]) == 0
    # compressed-tensors -> qcore: the imported checkpoint saves as the tensors it came from
    assert main(["export", "--model", str(ct), "--format", "qcore", "--out", str(again)]) == 0
    capsys.readouterr()
    first = json.loads((saved / "qcore.json").read_text())
    second = json.loads((again / "qcore.json").read_text())
    assert second["source"] == str(ct) and second["source_format"] == "compressed-tensors"
    assert second["tensors"] == first["tensors"]
    assert main(["evaluate", "--model", str(again), "--data", str(tiny_folder / "calib.txt"),
                 "--seq-len", "16", "--windows", "2", "--json"]) == 0


@pytest.mark.parametrize("package, argv, fragment", [
    ("lm_eval", ["--evaluator", "lm-eval", "--set", "tasks=[arc_easy]"],
     "evaluator 'lm-eval' needs the lm_eval package: pip install 'qcore[lm-eval]'"),
    ("datasets", ["--data", "hf:wikitext:wikitext-2-raw-v1:test"],
     "hf: sources need the datasets package: pip install 'qcore[datasets]'"),
])
def test_a_missing_optional_package_is_named_before_any_model_loads(tiny_folder, capsys,
                                                                     no_model_load,
                                                                     monkeypatch, package,
                                                                     argv, fragment):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == package else real(name, *a))
    _fails_with(["evaluate", "--model", str(tiny_folder / "tiny"), *argv], capsys, fragment)


def test_an_unavailable_backend_names_what_it_needs(tiny_folder, capsys, no_model_load):
    _fails_with(rtn_args(tiny_folder, "--backend", "npu"), capsys,
                "backend 'npu' is not available on this machine; it needs torch_npu: "
                "pip install torch-npu")
