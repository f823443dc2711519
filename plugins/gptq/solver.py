"""The GPTQ weight solver: what transforming methods (SmoothQuant, FlatQuant) compose to
round their transformed weights against the Hessian of the inputs the quantized linear
multiplies. The options are the GPTQ quantizer's solver options."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from qcore.interfaces import Backend, UnsupportedScheme, WeightSolver
from qcore.quant.linear import SolvedWeight
from qcore.quant.observers import MSEClip
from qcore.schemes import QuantArgs
from qcore_gptq.solve import GPTQOptions, gptq_quantize


class GPTQSolverConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    block_size: int = Field(
        default=128, gt=0,
        description="columns per lazy block; the result does not depend on it, only speed")
    damp: float = Field(
        default=0.01, ge=0.0,
        description="dampening added to diag(H), relative to mean(diag(H))")
    damp_step: float = Field(
        default=0.0015, gt=0.0,
        description="added to the relative dampening each time the Cholesky factorisation "
                    "fails")
    damp_max_steps: int = Field(
        default=50, ge=0,
        description="raises of the dampening tried before giving up with an error")
    act_order: bool = Field(
        default=True,
        description="process columns by descending diag(H) (the reference's --act-order); "
                    "false: natural column order, worse than RTN on SmolLM2 (see "
                    "docs/methods/gptq.md)")
    static_groups: bool = Field(
        default=True,
        description="group parameters computed up front from the original weights instead of "
                    "when the quantizer reaches a group (needed for act_order to keep groups "
                    "contiguous in the natural column order)")
    mse_clip: bool = Field(
        default=False,
        description="search the quantizer's range over shrink factors p = 1 - i/mse_grid "
                    "minimising sum |Q(w) - w|^mse_norm")
    mse_grid: int = Field(default=100, gt=0, description="grid resolution of the clip search")
    mse_max_shrink: float = Field(
        default=0.8, gt=0.0, le=1.0, description="largest shrink tried (p down to 1 - this)")
    mse_norm: float = Field(default=2.4, gt=0.0, description="error exponent of the search")

    def clip(self) -> MSEClip | None:
        return MSEClip(self.mse_grid, self.mse_max_shrink, self.mse_norm) \
            if self.mse_clip else None

    def options(self) -> GPTQOptions:
        """These options as the solve's (:func:`qcore_gptq.solve.gptq_quantize`)."""
        return GPTQOptions(
            block_size=self.block_size, act_order=self.act_order,
            static_groups=self.static_groups, damp=self.damp, damp_step=self.damp_step,
            damp_max_steps=self.damp_max_steps, mse=self.clip())


class GPTQSolver(WeightSolver):
    name = "gptq"
    Config = GPTQSolverConfig
    description = "GPTQ error feedback against the input Hessian"
    needs_hessian = True

    def check_args(self, args: QuantArgs) -> None:
        if args.granularity not in ("channel", "group"):
            raise UnsupportedScheme(f"the gptq solver needs per-channel or per-group weights, "
                                    f"not granularity {args.granularity!r}")

    def solve(self, weight: torch.Tensor, args: QuantArgs, hessian: torch.Tensor | None,
              backend: Backend, name: str) -> SolvedWeight:
        if hessian is None:
            raise ValueError(f"{name}: the gptq solver needs the input Hessian")
        cfg: GPTQSolverConfig = self.config
        res = gptq_quantize(weight.detach(), hessian, args, cfg.options(), linalg=backend,
                            name=name)
        return SolvedWeight(weight=res.Q, scale=res.scale, zero=res.zero, g_idx=res.g_idx,
                            stats={"loss": res.loss, "damp": res.damp})
