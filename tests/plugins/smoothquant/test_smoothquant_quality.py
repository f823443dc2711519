"""SmoothQuant W8A8 on the real SmolLM2-135M (slow)."""

from __future__ import annotations

import copy

import pytest

from qcore.api import perplexity, quantize
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear


@pytest.mark.slow
def test_smoothquant_w8a8_quality_smollm2(smollm2):
    model, tokenizer = smollm2
    held_out = DataSpec(source="pydoc", part="tail")
    calibration = CalibrationConfig(data=DataSpec(source="pydoc", part="head"), samples=4,
                                    seq_len=512)
    fp = perplexity(model, tokenizer, held_out, seq_len=512, windows=8)

    def run(method: str, **options) -> float:
        cfg = RunConfig(model="smollm2", method=method, scheme="W8A8", method_config=options,
                        calibration=calibration)
        result = quantize(cfg, model=copy.deepcopy(model), tokenizer=tokenizer, progress=False)
        qlinears = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
        # perplexity runs on the CPU backend's real int8 kernel
        assert qlinears and all(m.kernel is not None for m in qlinears)
        return perplexity(result.model, tokenizer, held_out, seq_len=512, windows=8)

    rtn = run("rtn")
    sq = run("smoothquant", alpha=0.5)
    print(f"fp32 {fp:.3f}  W8A8 RTN {rtn:.3f}  SmoothQuant W8A8 {sq:.3f}")
    assert sq < fp * 1.02
    assert sq < rtn
