"""The CPU backend's real W8A8 integer kernel against the QuantLinear reference path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import qparams_from_range
from qcore.schemes import QuantArgs, get_scheme
from qcore_backends.cpu import int8
from qcore_backends.cpu.backend import CPUBackend

W8 = QuantArgs(bits=8, symmetric=True, granularity="channel")
TOKEN = QuantArgs(bits=8, symmetric=True, granularity="token", dynamic=True)
STATIC = QuantArgs(bits=8, symmetric=True, granularity="tensor")


def _layer(k=96, n=80, bias=True, act=TOKEN, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    q = QuantLinear.from_float(linear, W8, activations=act)
    if act.granularity == "tensor":
        scale, zero = qparams_from_range(torch.tensor(-6.0), torch.tensor(6.0), 8, True)
        q.input_scale.copy_(scale)
        q.input_zero.copy_(zero)
    return q


def _inputs(shape, k, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, k, generator=gen)
    x[..., 7] *= 25  # an outlier channel
    return x


@torch.no_grad()
@pytest.mark.parametrize("engine", int8.ENGINES)
@pytest.mark.parametrize("act", [TOKEN, STATIC], ids=["token", "static"])
@pytest.mark.parametrize("shape", [(1,), (1, 1), (3, 5), (2, 33)])
def test_kernel_equals_reference_within_one_step(engine, act, shape):
    q = _layer(act=act, bias=len(shape) > 1)
    x = _inputs(shape, q.in_features)
    ref = q.reference_forward(x)
    if engine == "fbgemm" and not int8.HAS_VNNI:
        with pytest.raises(RuntimeError, match="VNNI"):
            int8.KERNELS[engine](q, x)
        return
    out = int8.KERNELS[engine](q, x)
    assert out.shape == ref.shape and out.dtype == x.dtype
    # one quantization step of an activation moves output n by at most scale_x * |w_n|_max
    x2 = x.reshape(-1, x.shape[-1])
    if act.granularity == "token":
        step = x2.abs().amax(-1, keepdim=True) / 127
    else:
        step = q.input_scale.expand(x2.shape[0], 1)
    w = q.dequantize()
    one_step = (step * w.abs().amax(1)).reshape(ref.shape)
    assert bool(((out - ref).abs() <= one_step).all())
    # in fact the codes are identical, so only float rounding of the result remains
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@torch.no_grad()
def test_codes_match_reference_fake_quantization():
    x = _inputs((4, 9), 96)
    codes, scale = int8.quantize_tokens(x.reshape(-1, 96))
    from qcore.quant.qparams import fake_quantize_activation

    deq = fake_quantize_activation(x, TOKEN).reshape(-1, 96)
    torch.testing.assert_close(codes * scale, deq, rtol=0, atol=0)
    assert float(codes.abs().max()) == 127


def test_weight_codes_are_signed_int8():
    q = _layer()
    wq, ws = int8.weight_int8(q)
    assert wq.dtype == torch.int8
    torch.testing.assert_close(wq.float() * ws[:, None], q.dequantize())


def test_backend_chooses_kernel_only_when_the_scheme_asks():
    backend = CPUBackend()
    assert backend.kernel_for(_layer()) is not None
    assert backend.kernel_for(_layer(act=STATIC)) is not None
    lin = nn.Linear(128, 32)
    assert backend.kernel_for(QuantLinear.from_float(lin, get_scheme("W4A16").weights)) is None
    assert backend.kernel_for(QuantLinear.from_float(lin, W8)) is None  # W8A16
    w4a4 = get_scheme("W4A4")
    assert backend.kernel_for(QuantLinear.from_float(lin, w4a4.weights,
                                                     activations=w4a4.activations)) is None
    asym = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)
    assert backend.kernel_for(QuantLinear.from_float(lin, W8, activations=asym)) is None
    assert any(k.startswith("W8A8") for k in backend.real_kernels())


@torch.no_grad()
def test_install_kernels_and_cache_invalidation():
    q = _layer()
    model = nn.Sequential(q)
    counts = CPUBackend().install_kernels(model)
    assert counts == {f"w8a8_int8_{int8.selected_engine()}": 1}
    x = _inputs((2, 3), q.in_features)
    first = model(x)
    # changing the codes in place must repack the weights
    other = _layer(seed=5)
    q.qweight.copy_(other.qweight)
    q.scales.copy_(other.scales)
    q._dequant_cache = None
    torch.testing.assert_close(model(x), q.reference_forward(x), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, model(x))


@torch.no_grad()
@pytest.mark.parametrize("vnni", [True, False], ids=["direct", "split"])
def test_onednn_gemm_is_exact_at_extreme_codes(monkeypatch, vnni):
    """u8 x s8 pairs near 255 x 127 overflow int16 on CPUs without VNNI; the split path must
    give the exact integer product there (the direct path is only run where VNNI exists)."""
    if vnni and not int8.HAS_VNNI:
        pytest.skip("this CPU has no VNNI: the direct u8 x s8 GEMM saturates")
    monkeypatch.setattr(int8, "HAS_VNNI", vnni)
    q = _layer(act=TOKEN, bias=False)
    wq, ws = int8.weight_int8(q)
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(-127, 128, (9, q.in_features), generator=gen).float()
    codes[0] = 127
    codes[1] = -127
    exact = (codes.double() @ wq.double().t()) * ws.double()
    out = int8.int8_gemm_onednn(q, codes.clone().add_(128).to(torch.uint8))
    assert float((out.double() - exact).abs().max() / exact.abs().max()) < 1e-6
