"""FlatQuant on the real SmolLM2-135M: W4A4 far below RTN W4A4 even with a short training."""

import pytest

from qcore.api import perplexity, quantize
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec

EVAL = DataSpec(source="pydoc", part="tail")


def _quantize(model, tokenizer, method, options):
    calib = CalibrationConfig(data=DataSpec(source="pydoc", part="head"), samples=4,
                              seq_len=256, batch_size=4)
    config = RunConfig(model="smollm2", method=method, scheme="W4A4", calibration=calib,
                       method_config=options)
    return quantize(config, model=model, tokenizer=tokenizer, progress=False)


@pytest.mark.slow
def test_flatquant_w4a4_far_below_rtn_on_smollm2(smollm2_master, smollm2):
    import copy

    model, tokenizer = smollm2
    rtn_model = copy.deepcopy(smollm2_master[0])
    fq = _quantize(model, tokenizer, "flatquant", {"epochs": 1, "batch_size": 2})
    _quantize(rtn_model, tokenizer, "rtn", {})
    ppl_fq = perplexity(model, tokenizer, EVAL, seq_len=512, windows=8)
    ppl_rtn = perplexity(rtn_model, tokenizer, EVAL, seq_len=512, windows=8)
    print(f"SmolLM2 W4A4 pydoc-tail ppl: flatquant {ppl_fq:.2f}, rtn {ppl_rtn:.2f}")
    assert ppl_fq < 0.5 * ppl_rtn
    # the per-layer report carries the training signal (start/end loss, time)
    for layer in fq.report.layers:
        assert layer.stats["loss_start"] > 0 and layer.stats["loss_end"] > 0
        assert layer.stats["train_seconds"] > 0
