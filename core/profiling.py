"""Named time ranges inside real kernels, visible to ``torch.profiler``.

A backend's integer kernel marks its steps (the run-time activation quantization, the
integer GEMM) with :func:`kernel_range`; the ``kernel-time`` evaluator profiles a forward
and sums the ranges, which is how a study measures the share of an INT8 deployment's time
spent in dynamic activation quantization. Outside a profiler the ranges cost one attribute
read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

#: the run-time quantization of a linear's input (per-token absmax, scale, round)
ACTIVATION_QUANT = "qcore::activation_quant"
#: the integer matrix product and its rescaling to float
INT_GEMM = "qcore::int_gemm"
KERNEL_RANGES = (ACTIVATION_QUANT, INT_GEMM)


@contextlib.contextmanager
def _recorded(name: str) -> Iterator[None]:
    with torch.profiler.record_function(name):
        yield


def kernel_range(name: str) -> contextlib.AbstractContextManager[None]:
    """A profiler range named ``name`` while a profiler runs; otherwise nothing."""
    if torch.autograd.profiler._is_profiler_enabled:
        return _recorded(name)
    return contextlib.nullcontext()
