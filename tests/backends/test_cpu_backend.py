import torch
import torch.nn.functional as F
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs
from qcore_backends.cpu.backend import CPUBackend


def test_cpu_backend_contract():
    be = CPUBackend()
    assert be.device.type == "cpu" and be.offload_device.type == "cpu"
    mem = be.memory_stats()
    assert 0 < mem.rss_mb <= mem.peak_rss_mb
    a = torch.randn(6, 6, dtype=torch.float64)
    h = a @ a.T + 6 * torch.eye(6, dtype=torch.float64)
    low = be.cholesky(h)
    torch.testing.assert_close(low @ low.T, h)
    torch.testing.assert_close(be.cholesky_inverse(low), torch.linalg.inv(h))
    be.synchronize()


def test_reference_path_is_exact_dequantize_then_matmul():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16)
    q = QuantLinear.from_float(linear, QuantArgs(bits=4, symmetric=False, granularity="group",
                                                 group_size=16))
    model = nn.Sequential(q)
    counts = CPUBackend().install_kernels(model)
    x = torch.randn(4, 64)
    expected = F.linear(x, q.dequantize(), linear.bias)
    assert counts.get("reference") == 1 or q.kernel is not None
    if q.kernel is None:
        assert torch.equal(q(x), expected)


def test_half_precision_layers_run_in_float32_without_native_support(monkeypatch):
    be = CPUBackend()
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported",
                  "_is_amx_fp16_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: False, raising=False)
    assert be.compute_dtype(torch.bfloat16) == torch.float32
    assert be.compute_dtype(torch.float16) == torch.float32
    assert be.compute_dtype(torch.float32) == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert be.compute_dtype(torch.bfloat16) == torch.bfloat16
    assert be.compute_dtype(torch.float16) == torch.float32
