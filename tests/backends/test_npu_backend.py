"""The NPU backend's argument mapping, checked against a stand-in torch_npu that implements
each operator exactly as Ascend documents it (REFERENCE.md). torch_npu itself cannot be
installed here (it breaks `import torch` without CANN)."""

import sys
import types

import pytest
import torch
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import qparams_from_range
from qcore.schemes import QuantArgs
from qcore_backends.npu.backend import NPUBackend


def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    nibbles = [((packed >> (4 * j)) & 0xF) for j in range(8)]
    values = torch.stack(nibbles, dim=-1).reshape(packed.shape[0], -1)
    return torch.where(values >= 8, values - 16, values)


def _fake_torch_npu() -> types.ModuleType:
    npu = types.ModuleType("torch_npu")

    def npu_convert_weight_to_int4pack(w):
        assert w.dtype == torch.int32 and w.shape[-1] % 8 == 0
        assert int(w.min()) >= -8 and int(w.max()) <= 7
        u = (w & 0xF).reshape(w.shape[0], -1, 8)
        out = torch.zeros(u.shape[:2], dtype=torch.int64)
        for j in range(8):
            out |= u[..., j].long() << (4 * j)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
                                     bias=None, antiquant_group_size=0):
        w = (_unpack_int4(weight) if weight.dtype == torch.int32 else weight).float()
        scale, offset = antiquant_scale.float(), antiquant_offset
        if antiquant_group_size:
            scale = scale.repeat_interleave(antiquant_group_size, dim=0)
            if offset is not None:
                offset = offset.repeat_interleave(antiquant_group_size, dim=0)
        if offset is not None:
            w = w + offset.float()  # the offset is ADDED
        y = x.float() @ (w * scale)
        return (y + bias if bias is not None else y).to(x.dtype)

    def npu_dynamic_quant(x, smooth_scales=None):
        scale = x.abs().amax(-1).float() / 127
        return torch.round(x / scale[..., None]).to(torch.int8), scale

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                         output_dtype=torch.float16):
        assert x1.dtype == torch.int8 and x2.dtype == torch.int8
        acc = (x1.to(torch.int64) @ x2.to(torch.int64)).double()
        out = acc * scale.double() * pertoken_scale.double()[:, None]
        return out.to(output_dtype)

    for fn in (npu_convert_weight_to_int4pack, npu_weight_quant_batchmatmul,
               npu_dynamic_quant, npu_quant_matmul):
        setattr(npu, fn.__name__, fn)
    return npu


@pytest.fixture
def npu_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", _fake_torch_npu())
    return NPUBackend(device="cpu")


def _check(module: QuantLinear, backend: NPUBackend, kernel_name: str, atol: float):
    kernel = backend.kernel_for(module)
    assert kernel is not None and kernel.__name__ == kernel_name
    x = torch.randn(3, 5, module.in_features)
    expected = module.reference_forward(x)
    module.kernel = kernel
    torch.testing.assert_close(module(x), expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, symmetric=False, granularity="group", group_size=16),
    QuantArgs(bits=4, symmetric=True, granularity="channel"),
    QuantArgs(bits=8, symmetric=True, granularity="channel"),
    QuantArgs(bits=8, symmetric=False, granularity="group", group_size=32),
])
def test_weight_only_kernel_matches_the_reference(npu_backend, args):
    torch.manual_seed(0)
    module = QuantLinear.from_float(nn.Linear(64, 32, bias=True), args)
    _check(module, npu_backend, "weight_only_kernel", 1e-4)


def test_act_order_groups_are_made_contiguous(npu_backend):
    torch.manual_seed(1)
    linear = nn.Linear(32, 16, bias=False)
    perm = torch.randperm(32)
    g_idx = torch.empty(32, dtype=torch.int32)
    g_idx[perm] = torch.arange(32, dtype=torch.int32) // 8
    w = linear.weight.detach()
    params = [qparams_from_range(w[:, perm[i:i + 8]].amin(1), w[:, perm[i:i + 8]].amax(1), 4,
                                 False) for i in range(0, 32, 8)]
    scale = torch.stack([p[0] for p in params], 1)
    zero = torch.stack([p[1] for p in params], 1)
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=8)
    module = QuantLinear.from_float(linear, args, scale=scale, zero=zero, g_idx=g_idx)
    _check(module, npu_backend, "weight_only_kernel", 1e-4)


def test_w8a8_dynamic_kernel_matches_the_reference(npu_backend):
    torch.manual_seed(2)
    act = QuantArgs(bits=8, symmetric=True, granularity="token", dynamic=True)
    module = QuantLinear.from_float(nn.Linear(64, 48, bias=True), QuantArgs(bits=8),
                                    activations=act)
    _check(module, npu_backend, "w8a8_dynamic_kernel", 1e-4)


def test_unsupported_schemes_use_the_reference_path(npu_backend):
    asym_act = QuantArgs(bits=4, symmetric=False, granularity="token", dynamic=True)
    module = QuantLinear.from_float(nn.Linear(16, 8), QuantArgs(bits=4), activations=asym_act)
    assert npu_backend.kernel_for(module) is None
    three_bit = QuantLinear.from_float(nn.Linear(16, 8), QuantArgs(bits=3))
    assert npu_backend.kernel_for(three_bit) is None


def test_cholesky_runs_on_the_cpu_in_double(npu_backend):
    a = torch.randn(5, 5)
    h = a @ a.T + 5 * torch.eye(5)
    low = npu_backend.cholesky(h)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low @ low.T, h, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(npu_backend.cholesky_inverse(low), torch.linalg.inv(h),
                               rtol=1e-4, atol=1e-5)


def test_npu_is_listed_but_unavailable_without_torch_npu(plugins):
    assert "npu" in plugins.registry("backend")
    if "torch_npu" not in sys.modules:
        assert NPUBackend.is_available() is False
