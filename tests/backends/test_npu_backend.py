"""The NPU backend's argument mapping, checked against a stand-in torch_npu that implements
each operator exactly as Ascend documents it (REFERENCE.md). torch_npu itself cannot be
installed here (it breaks `import torch` without CANN)."""

import sys

import pytest
import torch
from conftest import fake_torch_npu
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import qparams_from_range
from qcore.schemes import QuantArgs
from qcore_backends.npu.backend import NPUBackend


@pytest.fixture
def npu_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu())
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
