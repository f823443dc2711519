"""Ascend NPU backend (torch_npu, imported lazily).

Real kernels: W8A8 dynamic (``npu_dynamic_quant`` + ``npu_quant_matmul``, the study's INT8
deployment) and W8A16 / W4A16 (``npu_weight_quant_batchmatmul``). Every other scheme runs
through QuantLinear's reference path on the NPU. Cholesky is not native on Ascend, so
:meth:`cholesky` and :meth:`cholesky_inverse` run on the CPU in float64 and move back.
"""

from __future__ import annotations

import importlib.util

import torch

from qcore import hostmemory as memory
from qcore.interfaces import Backend, MemoryStats
from qcore.quant.linear import Kernel, QuantLinear
from qcore_backends.npu import kernels


class NPUBackend(Backend):
    name = "npu"
    description = "Ascend NPU via torch_npu (W8A8 dynamic, W8A16, W4A16 kernels)"
    accelerator = "NPU"  # the resource name vllm-ascend registers in Ray
    requires = {"torch_npu": "pip install torch-npu (with Ascend CANN installed; never into "
                             "a CPU-only environment)"}

    def __init__(self, device: str | torch.device | None = None) -> None:
        self._device = torch.device(device) if device is not None else None
        self._pinned = device is not None  # one named device: no spreading over the others

    @classmethod
    def is_available(cls) -> bool:
        if importlib.util.find_spec("torch_npu") is None:
            return False
        try:
            kernels.torch_npu()
            return bool(torch.npu.is_available())  # type: ignore[attr-defined]
        except Exception:
            return False

    @property
    def device(self) -> torch.device:
        if self._device is None:
            kernels.torch_npu()  # registers the "npu" device type
            self._device = torch.device("npu", torch.npu.current_device())  # type: ignore
        return self._device

    @property
    def devices(self) -> list[torch.device]:
        """Every visible Ascend device (``ASCEND_RT_VISIBLE_DEVICES`` selects them), or the
        one this backend was built for."""
        if self._pinned:
            return [self.device]
        first = self.device
        count = int(torch.npu.device_count())  # type: ignore[attr-defined]
        return [first] + [torch.device("npu", i) for i in range(count) if i != first.index]

    def device_memory_bytes(self, device: torch.device) -> int | None:
        try:
            return int(torch.npu.mem_get_info(device)[0])  # type: ignore[attr-defined]
        except (AttributeError, RuntimeError):
            return None

    def real_kernels(self) -> dict[str, str]:
        return {"W8A8": "npu_dynamic_quant + npu_quant_matmul (per-token dynamic)",
                "W8A16": "npu_weight_quant_batchmatmul (int8)",
                "W4A16": "npu_weight_quant_batchmatmul (int4 packed int32)"}

    def kernel_for(self, module: QuantLinear) -> Kernel | None:
        if kernels.supports_w8a8_dynamic(module):
            return kernels.w8a8_dynamic_kernel
        if kernels.supports_weight_only(module):
            return kernels.weight_only_kernel
        return None

    def cholesky(self, a: torch.Tensor, upper: bool = False) -> torch.Tensor:
        return torch.linalg.cholesky(a.cpu().double(), upper=upper).to(a.device, a.dtype)

    def cholesky_inverse(self, factor: torch.Tensor, upper: bool = False) -> torch.Tensor:
        out = torch.cholesky_inverse(factor.cpu().double(), upper=upper)
        return out.to(factor.device, factor.dtype)

    def _npu(self):
        return getattr(torch, "npu", None) if self.device.type == "npu" else None

    def memory_stats(self) -> MemoryStats:
        npu = self._npu()
        allocated = peak = None
        if npu is not None:
            allocated = npu.memory_allocated(self.device) / 2**20
            peak = npu.max_memory_allocated(self.device) / 2**20
        return MemoryStats(rss_mb=memory.rss_mb(), peak_rss_mb=memory.peak_rss_mb(),
                           device_allocated_mb=allocated, device_peak_mb=peak)

    def reset_peak_memory(self) -> None:
        memory.reset_peak_rss()
        npu = self._npu()
        if npu is not None:
            npu.reset_peak_memory_stats(self.device)

    def synchronize(self) -> None:
        npu = self._npu()
        if npu is not None:
            npu.synchronize()

    def release_host_memory(self, ranges: list[tuple[int, int]]) -> None:
        memory.page_out_file_backed(ranges)

    def empty_cache(self) -> None:
        npu = self._npu()
        if npu is not None:
            npu.empty_cache()
