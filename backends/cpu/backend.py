"""CPU reference backend: the numerical oracle every other backend is tested against.

QuantLinear layers run through their reference path (exact dequantization, then a float
matmul). Real integer kernels for the CPU register themselves in :data:`CPU_KERNELS`."""

from __future__ import annotations

from collections.abc import Callable

import torch

from qcore import hostmemory as memory
from qcore.interfaces import Backend, MemoryStats
from qcore.quant.linear import Kernel, QuantLinear
from qcore_backends.cpu import int8

#: (predicate on a layer, kernel, description) tried in order; the first match is used.
CPU_KERNELS: list[tuple[Callable[[QuantLinear], bool], Kernel, str]] = [
    (int8.supports, int8.KERNELS[int8.selected_engine()],
     f"W8A8: int8 x int8 -> int32 ({int8.selected_engine()}), symmetric per-token dynamic "
     "or per-tensor static activations, per-channel weights"),
]


class CPUBackend(Backend):
    name = "cpu"
    description = "CPU reference numerics (exact dequantize + float matmul)"

    def __init__(self, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def compute_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """float32 for bf16/fp16 layers on a CPU without native half-precision dot products
        (AVX-512 BF16/FP16 or AMX): oneDNN then falls back to kernels ~10x slower than
        float32 (on this project's AVX2 CPU: 14 vs 144 GFLOPS for a 2048 x 3584 x 18944
        matmul, `python benchmarks/bench_streaming.py --matmul`)."""
        probes = {torch.bfloat16: ("_is_avx512_bf16_supported", "_is_amx_tile_supported"),
                  torch.float16: ("_is_amx_fp16_supported",)}.get(dtype)
        if probes is None or any(getattr(torch.cpu, p, lambda: False)() for p in probes):
            return dtype
        return torch.float32

    def real_kernels(self) -> dict[str, str]:
        return {desc.split(":")[0]: desc for _, _, desc in CPU_KERNELS}

    def kernel_for(self, module: QuantLinear) -> Kernel | None:
        for applies, kernel, _ in CPU_KERNELS:
            if applies(module):
                return kernel
        return None

    def memory_stats(self) -> MemoryStats:
        return MemoryStats(rss_mb=memory.rss_mb(), peak_rss_mb=memory.peak_rss_mb())

    def reset_peak_memory(self) -> None:
        memory.reset_peak_rss()

    def release_host_memory(self, ranges: list[tuple[int, int]]) -> None:
        memory.page_out_file_backed(ranges)

    def empty_cache(self) -> None:
        memory.release_freed_memory()
