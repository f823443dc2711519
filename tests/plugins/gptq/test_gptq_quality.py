"""Quality on the real SmolLM2-135M: GPTQ W4A16 asymmetric g64 has clearly lower
perplexity than RTN at the same scheme (offline pydoc text: calibrate on the head,
evaluate on the tail)."""

from __future__ import annotations

import copy

import pytest
import torch

from qcore.api import perplexity, quantize
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec

SAMPLES = 32     # calibration windows (the benchmark uses 128)
SEQ_LEN = 512
WINDOWS = 8      # evaluation windows


@pytest.fixture
def _threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, threads))
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_gptq_perplexity_clearly_below_rtn(smollm2, _threads):
    model, tokenizer = smollm2
    calib = CalibrationConfig(data=DataSpec(source="pydoc", part="head"), samples=SAMPLES,
                              seq_len=SEQ_LEN)
    tail = DataSpec(source="pydoc", part="tail")

    def run(method, options):
        m = copy.deepcopy(model)
        config = RunConfig(model="smollm2", method=method, scheme="W4A16", group_size=64,
                           method_config=options, calibration=calib)
        result = quantize(config, model=m, tokenizer=tokenizer, progress=False)
        return perplexity(m, tokenizer, tail, seq_len=SEQ_LEN, windows=WINDOWS), result.report

    fp = perplexity(model, tokenizer, tail, seq_len=SEQ_LEN, windows=WINDOWS)
    rtn, _ = run("rtn", {})
    gptq, report = run("gptq", {})  # the defaults: act-order with static groups
    print(f"\nSmolLM2-135M pydoc tail ppl: fp32 {fp:.3f}, RTN W4A16 g64 {rtn:.3f}, "
          f"GPTQ {gptq:.3f}")
    # GPTQ's objective is below RTN's for every layer on the calibration data
    for layer in report.layers:
        assert layer.stats["loss"] < layer.stats["rtn_loss"], layer.name
    assert fp < gptq
    # clearly below RTN: measured 12.385 against fp32 11.249 and RTN 14.455, i.e. 35% of
    # RTN's degradation over fp32 left; pinned at under 45%
    assert gptq - fp < 0.45 * (rtn - fp), (fp, rtn, gptq)
