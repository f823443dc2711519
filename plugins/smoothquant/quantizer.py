"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights, then W8A8.

Per decoder layer:

1. Per-input-channel activation maxima ``a_j = max |X_j|`` over every calibration token,
   collected with forward hooks on the linears of each smoothing group
   (``ctx.input_absmax``), before the layer is changed.
2. For each group (``ctx.adapter.smooth_groups(layer)``): ``w_j = max |W[:, j]|`` over all
   linears sharing the input, clamped to at least 1e-5; the factor
   ``s_j = clamp(a_j ** alpha / w_j ** (1 - alpha), min=1e-5)`` (mit-han-lab/smoothquant's
   ``smooth_ln_fcs``). ``s`` is folded exactly: the norm weight (or the previous linear's
   output rows and bias) is divided by ``s`` and the linears' input columns multiplied by
   it. The reference smooths only norm -> q/k/v and norm -> gate/up; ``smooth_linears``
   adds v -> o (when the shapes allow; not under GQA) and up -> down.
3. The smoothed linears are rounded by a registered weight solver (``weight_method``: RTN
   by default, GPTQ, or any third-party solver, resolved from the run's plugin manager with
   its own options; a Hessian-based solver sees each sequential group's inputs with the
   earlier groups already quantized), with int8 activations per token (dynamic,
   symmetric) or per tensor (static, from calibration).

With a KV-cache scheme keys and values are fake-quantized inside attention, after RoPE
(:mod:`qcore.quant.kvcache`): W8A8KV8 dynamically, asymmetric per head in groups over the
head dimension; W8A8C8 / W8A8C8-TENSOR with static symmetric scales (per KV channel /
per tensor), calibrated after the layer's linears are quantized from one pass of the
quantized layer over the calibration windows (the keys and values the deployed model
caches).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.context import AbsmaxObserver, LayerContext
from qcore.interfaces import ComposesSolver, LayerNameList
from qcore.models.adapter import ArchitectureAdapter, LinearGroup
from qcore.quant.folding import fold_scale
from qcore.quant.kvcache import (
    KVCacheQuantizer,
    KVCacheSpec,
    enable_kv_quantization,
    kv_calibration,
    spec_for,
    use_kv_attention,
)
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs, QuantScheme

#: the reference's floors: max |W_j| and the factor itself are clamped to at least this
CLAMP_MIN = 1e-5


class SmoothQuantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(
        default=0.5, ge=0.0, le=1.0,
        description="migration strength: s = max|X|^alpha / max|W|^(1-alpha); 0.5 in the "
                    "paper, 0.85 for Llama-2/3 and the study's reasoning models",
    )
    smooth_linears: bool = Field(
        default=False,
        description="also smooth linear -> linear pairs (v -> o where v and o have the "
                    "same shape, up -> down); the reference smooths only norm -> linears",
    )
    activation_mode: Literal["dynamic", "static"] = Field(
        default="dynamic",
        description="'dynamic': activations quantized per token at run time (the W8A8 "
                    "preset); 'static': one per-tensor scale per linear from calibration",
    )
    quantize: bool = Field(
        default=True,
        description="false: only smooth (fold the factors into the float weights)",
    )
    weight_method: str = Field(
        default="rtn",
        description="registered weight solver that rounds the smoothed weights "
                    "(e.g. 'rtn' or 'gptq'; list-plugins shows the solvers)",
    )
    weight_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the weight solver (its Config)",
    )
    skip: LayerNameList = Field(
        default_factory=list,
        description="linear names (relative to a decoder layer) left in full precision "
                    "(still smoothed)",
    )


def _act_stat_names(groups: list[LinearGroup]) -> list[str]:
    """One linear per group: they share the input, so its maxima are the group's."""
    return [g.linears[0] for g in groups]


@torch.no_grad()
def smoothing_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float
                      ) -> torch.Tensor:
    """s_j = clamp(a_j^alpha / clamp(max_rows |W_j|, 1e-5)^(1-alpha), 1e-5) in float32."""
    w_max = torch.stack([w.detach().abs().float().amax(dim=0) for w in weights]).amax(dim=0)
    w_max = w_max.clamp(min=CLAMP_MIN)
    a = act_absmax.float().to(w_max.device)
    return (a.pow(alpha) / w_max.pow(1.0 - alpha)).clamp(min=CLAMP_MIN)


def fold_scales(layer: nn.Module, group: LinearGroup, scales: torch.Tensor) -> None:
    """Fold a group's smoothing factors into the layer (:func:`qcore.quant.folding.fold_scale`)."""
    fold_scale(layer.get_submodule(group.prev), [layer.get_submodule(n) for n in group.linears],
               scales, group.kind)


def smoothing_groups(ctx: LayerContext, smooth_linears: bool) -> list[LinearGroup]:
    return [g for g in ctx.adapter.smooth_groups(ctx.layer) if g.kind == "norm" or smooth_linears]


@torch.no_grad()
def smooth_layer(ctx: LayerContext, alpha: float, smooth_linears: bool,
                 absmax: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Compute and fold the factors of each group from the activation maxima (``absmax``,
    by the first linear of each group; collected with a pass of the layer when not
    given)."""
    groups = smoothing_groups(ctx, smooth_linears)
    if not groups:
        return {}
    if absmax is None:
        absmax = ctx.input_absmax(_act_stat_names(groups))
    stats: dict[str, Any] = {}
    for group in groups:
        a = absmax[group.linears[0]]
        weights = [ctx.submodule(n).weight for n in group.linears]
        s = smoothing_factors(a, weights, alpha)
        fold_scales(ctx.layer, group, s)
        key = group.prev
        stats[f"{key}.act_absmax"] = float(a.max())
        stats[f"{key}.act_absmax_after"] = float((a / s.to(a.device)).max())
        stats[f"{key}.scale_min"] = float(s.min())
        stats[f"{key}.scale_max"] = float(s.max())
    return stats


def activation_args(scheme: QuantScheme, mode: str) -> QuantArgs | None:
    """The scheme's activation quantizer (bits, symmetry, clip, scale convention) in the
    configured mode: per token at run time, or per tensor from calibration."""
    act = scheme.activations
    if act is None:
        return None
    mode_fields = {"granularity": "token", "dynamic": True} if mode == "dynamic" else \
        {"granularity": "tensor", "dynamic": False}
    return QuantArgs.model_validate({**act.model_dump(), **mode_fields})


@torch.no_grad()
def calibrate_static_inputs(ctx: LayerContext, names: list[str]) -> dict[str, float]:
    """Per-tensor input scales of static QuantLinears from the calibration inputs they see
    (layers earlier in the block already quantized: the deployment's inputs)."""
    targets = [n for n in names if isinstance(ctx.submodule(n), QuantLinear)
               and ctx.submodule(n).input_scale is not None]
    if not targets:
        return {}
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def observe(name: str, _m: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> None:
        xf = x.detach().float()
        mn, mx = xf.amin(), xf.amax()
        lo[name] = mn if name not in lo else torch.minimum(lo[name], mn)
        hi[name] = mx if name not in hi else torch.maximum(hi[name], mx)

    ctx.forward({n: observe for n in targets}, keep_outputs=False)
    out = {}
    for name in targets:
        out[f"{name}.input_scale"] = ctx.submodule(name).set_input_range(lo[name], hi[name])
    return out


class SmoothQuantQuantizer(ComposesSolver):
    name = "smoothquant"
    default_scheme = "W8A8"
    Config = SmoothQuantConfig
    description = "SmoothQuant: per-channel smoothing folded into norms, then W8A8 (+KV8)"
    #: statistics of the float model, as the reference collects them: one float pass per
    #: layer gives the maxima and the next layer's inputs (``--propagation quantized``:
    #: llm-compressor's way, the quantized layer's outputs; no better on SmolLM2 W8A8,
    #: twice the time, docs/methods/smoothquant.md)
    propagation = "full"

    def __init__(self, config: SmoothQuantConfig, scheme: QuantScheme) -> None:
        super().__init__(config, scheme)
        self._observer: AbsmaxObserver | None = None

    def rounds_weights(self) -> bool:
        return self.config.quantize

    def prepare(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        if not self.config.quantize:
            return
        self.weight_solver()  # bound before the run
        kv = self.scheme.kv_cache
        if kv is not None and kv.dynamic:
            enable_kv_quantization(model, KVCacheSpec(keys=kv, values=kv))
        elif kv is not None:  # static: each layer gets its quantizer when it is calibrated
            use_kv_attention(model)

    def float_pass_hooks(self, ctx: LayerContext) -> dict[str, Any]:
        """The activation maxima come from the pipeline's pass of the float layer."""
        names = _act_stat_names(smoothing_groups(ctx, self.config.smooth_linears))
        self._observer = AbsmaxObserver(names)
        return self._observer.hooks()

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        observer, self._observer = self._observer, None
        absmax = observer.absmax if observer is not None and observer.absmax else None
        stats = smooth_layer(ctx, self.config.alpha, self.config.smooth_linears, absmax)
        if not self.config.quantize:
            return stats
        floats = {n: ctx.submodule(n) for n in ctx.adapter.linear_names()
                  if n not in self.config.skip}
        stats.update(ctx.solve_linears(
            self.weight_solver(), floats, self.scheme.weights,
            activations=activation_args(self.scheme, self.config.activation_mode)))
        if self.config.activation_mode == "static":
            stats.update(calibrate_static_inputs(ctx, ctx.adapter.linear_names()))
        kv = self.scheme.kv_cache
        if kv is not None and not kv.dynamic:
            stats.update(calibrate_static_kv(ctx, kv))
        return stats


def calibrate_static_kv(ctx: LayerContext, kv: QuantArgs) -> dict[str, Any]:
    """Attach a static KV-cache quantizer to the layer's attention and set its scales
    from one pass of the (quantized) layer over the calibration windows; the largest
    key and value scale for the report."""
    name = ctx.adapter.roles().attention
    info = ctx.adapter.attention_info()
    attn = ctx.submodule(name)
    quantizer = KVCacheQuantizer(spec_for(kv, kv, info.num_kv_heads, info.head_dim)
                                 ).to(ctx.device)
    attn.qcore_kv = quantizer
    with kv_calibration([quantizer]):
        ctx.forward({}, keep_outputs=False)
    return {f"{name}.{role}_scale_max": float(getattr(quantizer, f"{role}_scale").max())
            for role in ("key", "value")}
