"""RTN weight-only (and with dynamic activations) depends on no activation: a run forwards
only the windows its per-layer error is measured on, and the model is the same."""

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear
from qcore_rtn.quantizer import RTNQuantizer


def _run(folder, scheme, monkeypatch, forced=None, options=None):
    seen = []
    real = api.run_layerwise

    def spy(model, quantizer, adapter, backend, calib_ids, *args, **kwargs):
        seen.append(calib_ids.shape[0])
        return real(model, quantizer, adapter, backend, calib_ids, *args, **kwargs)

    monkeypatch.setattr(api, "run_layerwise", spy)
    if forced is not None:
        monkeypatch.setattr(RTNQuantizer, "uses_calibration", lambda self: forced)
    config = RunConfig(model=str(folder / "tiny"), method="rtn", scheme=scheme,
                       group_size=32 if scheme == "W4A16" else None,
                       method_config=options or {}, error_windows=2,
                       calibration=CalibrationConfig(
                           data=DataSpec(source=str(folder / "calib.txt")), samples=8,
                           seq_len=16, batch_size=2))
    result = api.quantize(config, progress=False)
    monkeypatch.undo()
    return result, seen[0]


@pytest.mark.parametrize("scheme", ["W4A16", "W8A8"])
def test_rtn_forwards_only_the_error_windows_and_gives_the_same_model(tiny_folder,
                                                                      monkeypatch, scheme):
    fast, windows = _run(tiny_folder, scheme, monkeypatch)
    full, all_windows = _run(tiny_folder, scheme, monkeypatch, forced=True)
    assert (windows, all_windows) == (2, 8)
    for name, m in fast.model.named_modules():
        if isinstance(m, QuantLinear):
            other = full.model.get_submodule(name)
            for buf in ("qweight", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(m, buf), getattr(other, buf)), (name, buf)
    # the per-layer errors are measured on the same 2 windows either way
    assert [x.relative_mse for x in fast.report.layers] == pytest.approx(
        [x.relative_mse for x in full.report.layers], rel=1e-6)
    assert fast.report.layers[0].error_windows == 2


def test_static_activation_scales_still_read_every_window(tiny_folder, monkeypatch):
    from qcore.schemes import QuantArgs, QuantScheme

    static = QuantScheme(name="W8A8-static", weights=QuantArgs(bits=8),
                         activations=QuantArgs(bits=8, granularity="tensor"))
    assert RTNQuantizer(RTNQuantizer.Config(), static).uses_calibration()
    _, windows = _run(tiny_folder, static, monkeypatch)
    assert windows == 8
