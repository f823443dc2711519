"""AWQ on the real SmolLM2-135M: perplexity clearly below RTN at W4A16 and W3A16."""

from __future__ import annotations

import copy

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec

CALIB = CalibrationConfig(data=DataSpec(source="pydoc", part="head"), samples=4, seq_len=512,
                          batch_size=1)
EVAL = DataSpec(source="pydoc", part="tail")


def _ppl(model, tokenizer, method: str, bits: int, options: dict) -> float:
    config = RunConfig(model="smollm2", method=method, scheme=f"W{bits}A16", group_size=64,
                       calibration=CALIB, method_config=options)
    api.quantize(config, model=model, tokenizer=tokenizer, progress=False)
    return api.perplexity(model, tokenizer, EVAL, seq_len=512, windows=8)


@pytest.mark.slow
def test_awq_beats_rtn_on_smollm2(smollm2):
    model, tokenizer = smollm2
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the searches are many small ops: one thread is fastest
    try:
        _compare(model, tokenizer)
    finally:
        torch.set_num_threads(threads)


def _compare(model, tokenizer) -> None:
    results = {}
    for bits in (4, 3):
        # 4 calibration windows for the activation statistics and the clip sample; the
        # scale grid is scored on the first (the grid costs 20 block passes per group)
        results[bits] = (
            _ppl(copy.deepcopy(model), tokenizer, "rtn", bits, {}),
            _ppl(copy.deepcopy(model) if bits == 4 else model, tokenizer, "awq", bits,
                 {"search_samples": 1}),
        )
    rtn4, awq4 = results[4]
    rtn3, awq3 = results[3]
    print(f"W4A16 g64: rtn {rtn4:.2f} awq {awq4:.2f}; W3A16 g64: rtn {rtn3:.2f} awq {awq3:.2f}")
    # measured (pydoc, 4 windows, grid scored on 1): W4 rtn 14.46 awq 12.61;
    # W3 rtn 33.11 awq 18.89
    assert awq4 < 0.93 * rtn4
    assert awq3 < 0.75 * rtn3
