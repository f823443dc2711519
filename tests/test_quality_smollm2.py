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
    cfg = RunConfig(model="smollm2", method="rtn", scheme="W4A16", calibration=CALIB)
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
