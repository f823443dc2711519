"""Range observers, selectable per scheme: min/max and the MSE clip search."""

import pytest
import torch

from qcore.config import RunConfig
from qcore.quant.linear import QuantLinear
from qcore.quant.observers import MSEClip, find_params
from qcore.quant.qparams import fake_quantize_weight, weight_qparams
from qcore.schemes import QuantArgs

MINMAX = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
MSE = MINMAX.model_copy(update={"observer": "mse"})


def _weight():
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(0))
    w[3, 5] = 12.0  # an outlier the search can clip
    return w


def test_mse_observer_is_the_search_applied_per_row_and_group():
    w = _weight()
    scale, zero = weight_qparams(w, MSE)
    rows = w.reshape(24, 4, 16).reshape(-1, 16)
    s, z = find_params(rows, MINMAX, MSEClip())
    torch.testing.assert_close(scale, s.reshape(24, 4), rtol=0, atol=0)
    torch.testing.assert_close(zero, z.reshape(24, 4), rtol=0, atol=0)


@pytest.mark.parametrize("granularity, group", [("group", 16), ("channel", None),
                                                ("tensor", None)])
def test_mse_observer_never_loses_to_minmax_on_its_own_measure(granularity, group):
    w = _weight()
    base = QuantArgs(bits=3, symmetric=False, granularity=granularity, group_size=group)
    mse = base.model_copy(update={"observer": "mse"})

    def err(args):
        return float((fake_quantize_weight(w, args) - w).abs().pow(2.4).sum())

    assert err(mse) <= err(base)
    if granularity != "tensor":
        assert err(mse) < err(base)
    # the stored module computes exactly what the fake quantization computes
    linear = torch.nn.Linear(64, 24, bias=False)
    linear.weight.data = w
    torch.testing.assert_close(QuantLinear.from_float(linear, mse).dequantize(),
                               fake_quantize_weight(w, mse), rtol=0, atol=0)


def test_minmax_is_the_default_and_unchanged():
    assert QuantArgs(bits=4).observer == "minmax"
    w = _weight()
    scale, _ = weight_qparams(w, MINMAX)
    torch.testing.assert_close(scale, (w.reshape(24, 4, 16).amax(-1).clamp(min=0)
                                       - w.reshape(24, 4, 16).amin(-1).clamp(max=0)) / 15)


def test_observer_is_chosen_per_run_and_recorded_in_the_scheme():
    cfg = RunConfig(model="m", scheme="W4A16", group_size=64, observer="mse")
    scheme = cfg.resolved_scheme()
    assert scheme.weights.observer == "mse" and scheme.weights.group_size == 64
    assert "mse" in scheme.weights.describe()
    assert RunConfig(model="m").resolved_scheme().weights.observer == "minmax"


def test_gptq_with_the_mse_observer_equals_its_mse_clip_option():
    from qcore.quant.hessian import HessianAccumulator
    from qcore_gptq.solve import GPTQOptions, gptq_quantize

    w = _weight()
    acc = HessianAccumulator(64)
    acc.add(torch.randn(256, 64, generator=torch.Generator().manual_seed(1)))
    a = gptq_quantize(w, acc.H, MINMAX, GPTQOptions(mse=MSEClip()))
    b = gptq_quantize(w, acc.H, MSE)
    assert torch.equal(a.Q, b.Q) and torch.equal(a.scale, b.scale)
