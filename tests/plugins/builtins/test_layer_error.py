"""The layer-error evaluator against an independent computation from hidden states."""

import json

import pytest
import torch
from conftest import hide_package

from qcore import api
from qcore.cli import main


@pytest.fixture
def saved(tiny_folder, capsys):
    from conftest import rtn_args

    assert main(rtn_args(tiny_folder, "--save", str(tiny_folder / "q"), "--json")) == 0
    capsys.readouterr()
    return tiny_folder


def _hidden(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states


def _rel(a, b):
    return float((a - b).pow(2).sum() / b.pow(2).sum())


def test_alone_and_accumulated_match_a_direct_computation(saved, plugins, tmp_path):
    quantized, tokenizer, _ = api.load_model(str(saved / "q"), plugins)
    reference, _, _ = api.load_model(str(saved / "tiny"), plugins)
    options = {"reference": str(saved / "tiny"), "data": {"source": str(saved / "calib.txt")},
               "seq_len": 24, "windows": 3, "batch_size": 3, "plot": str(tmp_path / "e.png")}
    result = api.evaluate(quantized, tokenizer, "layer-error", options, plugins=plugins)
    rows = result.details["curves"]["cpu"]
    from qcore.data import tokenize

    ids = tokenize(tokenizer, (saved / "calib.txt").read_text())[:72].reshape(3, 24)
    fp, q = _hidden(reference, ids), _hidden(quantized, ids)
    layer0 = quantized.model.layers[0]
    pos = quantized.model.rotary_emb(fp[0], torch.arange(24).unsqueeze(0))
    with torch.no_grad():
        mask = torch.full((24, 24), float("-inf")).triu(1)[None, None]
        alone0 = layer0(fp[0], attention_mask=mask, position_embeddings=pos)
        alone0 = alone0[0] if isinstance(alone0, tuple) else alone0
    assert rows[0]["alone"] == pytest.approx(_rel(alone0, fp[1]), rel=1e-4)
    assert rows[0]["accumulated"] == pytest.approx(rows[0]["alone"], rel=1e-6)
    # layer 1 accumulated: the quantized model's own chain vs the float chain (the last
    # hidden state has the final norm applied, so compare the one before it)
    assert len(rows) == 2
    assert rows[0]["accumulated"] == pytest.approx(_rel(q[1], fp[1]), rel=1e-4)
    m = result.metrics
    assert m["max_alone"] == max(r["alone"] for r in rows)
    assert m["worst_layer"] in (0.0, 1.0) and m["final_accumulated"] == rows[-1]["accumulated"]
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    assert result.details["plot"] == str(tmp_path / "e.png")


def test_cli_writes_json_table_and_png(saved, tmp_path, capsys):
    png = tmp_path / "plot.png"
    rc = main(["evaluate", "--model", str(saved / "q"), "--evaluator", "layer-error",
               "--reference", str(saved / "tiny"), "--data", str(saved / "calib.txt"),
               "--seq-len", "16", "--windows", "2", "--set", f"plot={png}", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"mean_alone", "max_alone", "worst_layer", "final_accumulated"} <= set(out)
    assert len(out["details"]["table"]) == 2 and png.exists()
    rc = main(["evaluate", "--model", str(saved / "q"), "--evaluator", "layer-error",
               "--reference", str(saved / "tiny"), "--data", str(saved / "calib.txt"),
               "--seq-len", "16", "--windows", "2", "--set", "plot=none"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer-error details" in text and "model.layers.1" in text


def test_without_matplotlib_the_numbers_still_come(saved, plugins, tmp_path, monkeypatch):
    hide_package(monkeypatch, "matplotlib")
    quantized, tokenizer, _ = api.load_model(str(saved / "q"), plugins)
    result = api.evaluate(quantized, tokenizer, "layer-error",
                          {"reference": str(saved / "tiny"), "seq_len": 16, "windows": 2,
                           "data": {"source": str(saved / "calib.txt")},
                           "plot": str(tmp_path / "p.png")}, plugins=plugins)
    assert "matplotlib is not installed" in result.details["plot_skipped"]
    assert not (tmp_path / "p.png").exists() and result.metrics["max_alone"] > 0


def test_a_quantized_reference_is_refused(saved, plugins):
    quantized, tokenizer, _ = api.load_model(str(saved / "q"), plugins)
    with pytest.raises(ValueError, match="reference .* is a quantized model"):
        api.evaluate(quantized, tokenizer, "layer-error",
                     {"reference": str(saved / "q"), "seq_len": 16, "windows": 2,
                      "data": {"source": str(saved / "calib.txt")}}, plugins=plugins)


def test_example_plugin_flags_jumps():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "qcore_example_plugin", Path(__file__).parents[3] / "examples" /
        "qcore-example-plugin" / "qcore_example" / "plugin.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.flag_jumps([1e-3, 1.2e-3, 9e-3, 1.1e-3, 1e-3]) == [2]
    assert module.flag_jumps([1e-3, 1e-3]) == []
    assert module.flag_jumps([1.0, 0.1, 0.1], k=3) == [0]


def test_an_existing_plot_file_is_refused_before_any_work(saved, plugins, tmp_path,
                                                          monkeypatch):
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a picture of the user's")
    quantized, tokenizer, _ = api.load_model(str(saved / "q"), plugins)
    monkeypatch.setattr(api, "load_model", lambda *a, **k: pytest.fail("loaded the reference"))
    with pytest.raises(ValueError, match="mine.png exists"):
        api.evaluate(quantized, tokenizer, "layer-error",
                     {"reference": str(saved / "tiny"), "seq_len": 16, "windows": 2,
                      "data": {"source": str(saved / "calib.txt")}, "plot": str(mine)},
                     plugins=plugins)
    assert mine.read_bytes() == b"a picture of the user's"
