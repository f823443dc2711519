"""Named time ranges a backend's integer kernel marks its steps with (:func:`kernel_range`:
run-time activation quantization, integer GEMM), visible to ``torch.profiler`` and summed by
the ``kernel-time`` evaluator; outside a profiler a range costs one attribute read."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

#: the run-time quantization of a linear's input (per-token absmax, scale, round)
ACTIVATION_QUANT = "qcore::activation_quant"
#: the integer matrix product and its rescaling to float
INT_GEMM = "qcore::int_gemm"


def kernel_range(name: str) -> contextlib.AbstractContextManager[Any]:
    """A profiler range named ``name`` while a profiler runs; otherwise nothing."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()
