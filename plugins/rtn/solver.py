"""The RTN weight solver: min/max quantization parameters, nearest codes (no Hessian)."""

from __future__ import annotations

import torch

from qcore.interfaces import Backend, WeightSolver
from qcore.quant.linear import SolvedWeight
from qcore.quant.qparams import weight_qparams
from qcore.schemes import QuantArgs


class RTNSolver(WeightSolver):
    name = "rtn"
    description = "round-to-nearest with min/max ranges per channel or group"

    def solve(self, weight: torch.Tensor, args: QuantArgs, hessian: torch.Tensor | None,
              backend: Backend, name: str) -> SolvedWeight:
        scale, zero = weight_qparams(weight.detach(), args)
        return SolvedWeight(weight=weight.detach(), scale=scale, zero=zero)
