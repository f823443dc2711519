"""Quality on the real SmolLM2-135M-Instruct with offline text (Python's pydoc topics):
calibration on the first half, perplexity on held-out windows of the second half."""

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec

pytestmark = pytest.mark.slow

HELD_OUT = DataSpec(source="pydoc", part="tail")
CALIB = CalibrationConfig(data=DataSpec(source="pydoc", part="head"), samples=4, seq_len=512)


@pytest.fixture(scope="module")
def fp_ppl(smollm2_master):
    model, tokenizer = smollm2_master
    return api.perplexity(model, tokenizer, HELD_OUT, seq_len=512, windows=8)


def _rtn_ppl(model, tokenizer, scheme, group):
    cfg = RunConfig(model="smollm2", method="rtn", scheme=scheme, group_size=group,
                    calibration=CALIB)
    result = api.quantize(cfg, model=model, tokenizer=tokenizer, progress=False)
    return api.perplexity(result.model, tokenizer, HELD_OUT, seq_len=512, windows=8)


def test_rtn_w4a16_g64_raises_perplexity(smollm2, fp_ppl):
    ppl = _rtn_ppl(*smollm2, "W4A16", 64)
    assert 5 < fp_ppl < 50
    assert ppl > fp_ppl * 1.05


def test_rtn_w8a16_stays_within_one_percent(smollm2, fp_ppl):
    ppl = _rtn_ppl(*smollm2, "W8A16", None)
    assert abs(ppl - fp_ppl) / fp_ppl < 0.01


def test_group_128_is_refused_up_front_naming_the_layers(smollm2):
    model, tokenizer = smollm2
    cfg = RunConfig(model="smollm2", method="rtn", scheme="W4A16", group_size=128,
                    calibration=CALIB)
    with pytest.raises(api.ConfigError) as err:
        api.quantize(cfg, model=model, tokenizer=tokenizer, progress=False)
    msg = str(err.value)
    assert "self_attn.q_proj (576)" in msg and "model.layers.{0..29}" in msg


def test_gguf_loader_matches_the_cached_folder(smollm2_master):
    from qcore.engine.loading import load_gguf, smollm2_gguf

    model, _ = smollm2_master
    direct, tokenizer = load_gguf(smollm2_gguf())
    ids = torch.tensor([tokenizer("The quick brown fox").input_ids])
    with torch.no_grad():
        torch.testing.assert_close(direct(ids).logits, model(ids).logits)


#: `qcore quantize --model smollm2 --method M --save out/M [--samples 4]`, then perplexity
#: on the first 16 windows of 512 tokens of the pydoc tail: docs/results.md ("No options")
DEFAULTS = {"rtn": ([], "W4A16", 15.8534),
            "gptq": (["--samples", "4"], "W4A16", 13.7604),
            "smoothquant": (["--samples", "4"], "W8A8", 12.3883)}


@pytest.mark.parametrize("method", list(DEFAULTS))
def test_a_method_with_no_options_gives_its_documented_perplexity(method, smollm2_master,
                                                                   tmp_path, monkeypatch):
    from qcore.cli import main

    extra, scheme, pinned = DEFAULTS[method]
    monkeypatch.chdir(tmp_path)
    assert main(["quantize", "--model", "smollm2", "--method", method, "--save", method,
                 "--no-progress", *extra]) == 0
    model, tokenizer, meta = api.load_model(str(tmp_path / method))
    assert meta["scheme"]["name"] == scheme and meta["run"]["group_size"] == (
        64 if scheme == "W4A16" else None)
    ppl = api.perplexity(model, tokenizer, HELD_OUT, seq_len=512, windows=16)
    print(f"{method}: {ppl!r}")
    assert ppl == pytest.approx(pinned, rel=2e-3)
