import itertools

import pytest
import torch

from qcore.quant.qparams import (
    fake_quantize_activation,
    fake_quantize_weight,
    group_index,
    quantize_weight,
    weight_qparams,
)
from qcore.schemes import QuantArgs


def reference_fake_quant(w: torch.Tensor, bits: int, symmetric: bool, group: int | None):
    """Element-by-element reference of qcore's conventions (see core/schemes.py)."""
    out = torch.empty_like(w)
    cols = w.shape[1]
    g = group or cols
    for r, start in itertools.product(range(w.shape[0]), range(0, cols, g)):
        seg = w[r, start:start + g]
        lo, hi = min(float(seg.min()), 0.0), max(float(seg.max()), 0.0)
        if symmetric:
            scale = max(max(-lo, hi), 1e-5) / (2 ** (bits - 1) - 1)
            zero = 2 ** (bits - 1)
        else:
            scale = max(hi - lo, 1e-5) / (2**bits - 1)
            zero = min(max(-round(lo / scale), 0), 2**bits - 1)
        for c in range(seg.numel()):
            q = min(max(round(float(seg[c]) / scale) + zero, 0), 2**bits - 1)
            out[r, start + c] = (q - zero) * scale
    return out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [None, 8])
def test_rtn_weight_matches_elementwise_reference(bits, symmetric, group):
    torch.manual_seed(bits)
    w = torch.randn(6, 16)
    args = (QuantArgs(bits=bits, symmetric=symmetric, granularity="group", group_size=group)
            if group else QuantArgs(bits=bits, symmetric=symmetric, granularity="channel"))
    got = fake_quantize_weight(w, args)
    ref = reference_fake_quant(w, bits, symmetric, group)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def test_rtn_error_is_at_most_half_a_step_inside_the_range():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16)
    scale, _ = weight_qparams(w, args)
    err = (fake_quantize_weight(w, args) - w).abs()
    step = scale[:, group_index(64, args).long()]
    assert torch.all(err <= step / 2 + 1e-6)


def test_per_tensor_weight_parameters_are_shared():
    w = torch.randn(4, 8)
    scale, zero = weight_qparams(w, QuantArgs(bits=8, granularity="tensor"))
    assert scale.shape == (4, 1) and torch.all(scale == scale[0])


def test_codes_stay_in_range():
    w = torch.randn(8, 32) * 10
    args = QuantArgs(bits=3, symmetric=True, granularity="channel")
    scale, zero = weight_qparams(w, args)
    q = quantize_weight(w, scale, zero, group_index(32, args), 3)
    assert q.min() >= 0 and q.max() <= 7


def test_per_token_activation_quantization_is_per_row():
    x = torch.tensor([[1.0, -2.0, 0.5], [100.0, 50.0, -25.0]])
    args = QuantArgs(bits=8, symmetric=True, granularity="token", dynamic=True)
    y = fake_quantize_activation(x, args)
    # the absmax of each row is exactly representable; small row is not crushed by big row
    assert y[0, 1] == -2.0 and y[1, 0] == 100.0
    assert (y[0] - x[0]).abs().max() <= 2.0 / 127 / 2 + 1e-6


def test_static_activation_needs_a_scale():
    x = torch.randn(4, 8)
    args = QuantArgs(bits=8, granularity="tensor", dynamic=False)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize_activation(x, args)
    y = fake_quantize_activation(x, args, torch.tensor(0.01), torch.tensor(128.0))
    assert torch.all((y / 0.01 - torch.round(y / 0.01)).abs() < 1e-3)
