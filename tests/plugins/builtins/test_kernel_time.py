import copy

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec
from qcore.profiling import ACTIVATION_QUANT, kernel_range


def _w8a8(tiny_folder):
    data = DataSpec(source=str(tiny_folder / "calib.txt"))
    config = RunConfig(model=str(tiny_folder / "tiny"), method="rtn", scheme="W8A8",
                       calibration=CalibrationConfig(data=data, samples=2, seq_len=16,
                                                     batch_size=1))
    return api.quantize(config, progress=False), data


def test_kernel_time_counts_the_int8_kernel_and_splits_its_time(tiny_folder, one_thread):
    result, data = _w8a8(tiny_folder)
    options = {"data": data, "seq_len": 16, "windows": 3}
    metrics = api.evaluate(result.model, result.tokenizer, "kernel-time", options).metrics
    # 2 layers x 7 linears, 3 profiled forwards of one window (the warm-up is not counted)
    assert metrics["int_kernel_calls"] == 3 * 2 * 7
    assert 0 < metrics["activation_quant_seconds"] < metrics["forward_seconds"]
    share = metrics["activation_quant_seconds"] / (metrics["activation_quant_seconds"]
                                                   + metrics["int_gemm_seconds"])
    assert metrics["activation_quant_share_of_int_linear"] == pytest.approx(share)
    assert metrics["activation_quant_share"] + metrics["int_gemm_share"] < 1


def test_kernel_time_of_a_float_model_finds_no_integer_kernel(tiny_folder):
    model, tokenizer, _ = api.load_model(str(tiny_folder / "tiny"))
    result = api.evaluate(model, tokenizer, "kernel-time",
                          {"data": DataSpec(source=str(tiny_folder / "calib.txt")),
                           "seq_len": 16, "windows": 1})
    assert result.metrics["int_kernel_calls"] == 0
    assert result.metrics["activation_quant_share"] == 0 and "no real integer" in \
        result.details["note"]


def test_kernel_ranges_change_nothing_outside_a_profiler(tiny_folder):
    result, data = _w8a8(tiny_folder)
    ids = torch.arange(16).reshape(1, 16)
    expected = result.model(input_ids=ids).logits
    with torch.profiler.profile() as prof:
        profiled = copy.deepcopy(result.model)(input_ids=ids).logits
    assert torch.equal(expected, profiled)
    assert any(e.key == ACTIVATION_QUANT for e in prof.key_averages())
    with kernel_range(ACTIVATION_QUANT) as inside:  # no profiler: a null context
        assert inside is None
