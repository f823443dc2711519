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
3. The smoothed linears are quantized by a registered weight quantizer (RTN by default, or
   e.g. GPTQ, built through the plugin manager with its own options), with int8
   activations per token (dynamic, symmetric) or per tensor (static, from calibration).

With a KV-cache scheme (W8A8KV8) keys and values are fake-quantized inside attention,
asymmetric per head in groups over the head dimension (:mod:`qcore.quant.kvcache`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.interfaces import Quantizer, UnsupportedScheme
from qcore.models.adapter import ArchitectureAdapter, LinearGroup
from qcore.pipeline import LayerContext
from qcore.quant.kvcache import KVCacheSpec, enable_kv_quantization
from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import qparams_from_range
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
        description="registered quantizer that quantizes the smoothed weights "
                    "(e.g. 'rtn' or 'gptq')",
    )
    weight_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the weight quantizer (its Config)",
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


@torch.no_grad()
def fold_scales(layer: nn.Module, group: LinearGroup, scales: torch.Tensor) -> None:
    """Divide the producer's output channels by ``scales`` and multiply the consumers'
    input columns by it: the layer computes the same function in exact arithmetic."""
    prev = layer.get_submodule(group.prev)
    if group.kind == "norm":
        weight = getattr(prev, "weight", None)
        if weight is None:
            raise ValueError(f"{group.prev} has no weight to absorb the smoothing factors")
        weight.div_(scales.to(weight.dtype))
        bias = getattr(prev, "bias", None)
        if bias is not None:
            bias.div_(scales.to(bias.dtype))
    else:
        if prev.weight.shape[0] != scales.numel():
            raise ValueError(f"{group.prev} has {prev.weight.shape[0]} outputs, "
                             f"smoothing factors {scales.numel()}")
        prev.weight.div_(scales.to(prev.weight.dtype).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(scales.to(prev.bias.dtype))
    for name in group.linears:
        fc = layer.get_submodule(name)
        fc.weight.mul_(scales.to(fc.weight.dtype).view(1, -1))


@torch.no_grad()
def smooth_layer(ctx: LayerContext, alpha: float, smooth_linears: bool) -> dict[str, Any]:
    """Collect activation maxima with hooks, compute and fold the factors of each group."""
    groups = [g for g in ctx.adapter.smooth_groups(ctx.layer)
              if g.kind == "norm" or smooth_linears]
    if not groups:
        return {}
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
    """The scheme's activation bits/symmetry in the configured mode."""
    act = scheme.activations
    if act is None:
        return None
    if mode == "dynamic":
        return QuantArgs(bits=act.bits, symmetric=act.symmetric, granularity="token",
                         dynamic=True, clip_ratio=act.clip_ratio)
    return QuantArgs(bits=act.bits, symmetric=act.symmetric, granularity="tensor",
                     dynamic=False, clip_ratio=act.clip_ratio)


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
        module = ctx.submodule(name)
        args = module.spec.activations
        scale, zero = qparams_from_range(lo[name] * args.clip_ratio, hi[name] * args.clip_ratio,
                                         args.bits, args.symmetric)
        module.input_scale.copy_(scale)
        module.input_zero.copy_(zero)
        out[f"{name}.input_scale"] = float(scale)
    return out


class SmoothQuantQuantizer(Quantizer):
    name = "smoothquant"
    Config = SmoothQuantConfig
    description = "SmoothQuant: per-channel smoothing folded into norms, then W8A8 (+KV8)"

    def __init__(self, config: SmoothQuantConfig, scheme: QuantScheme) -> None:
        super().__init__(config, scheme)
        self._weight_quantizer: Quantizer | None = None
        if config.quantize:  # a wrong weight_method / weight_options fails before any work
            self.weight_quantizer(None)

    def check_scheme(self, scheme: QuantScheme) -> None:
        if self.config.weight_method == self.name:
            raise UnsupportedScheme("smoothquant weight_method cannot be 'smoothquant' itself")

    def _inner_scheme(self) -> QuantScheme:
        return QuantScheme(name=f"{self.scheme.name}-weights", weights=self.scheme.weights,
                           activations=activation_args(self.scheme,
                                                       self.config.activation_mode))

    def weight_quantizer(self, plugins: Any) -> Quantizer:
        """The quantizer that turns smoothed linears into QuantLinears, built once."""
        if self._weight_quantizer is None:
            if plugins is None:
                from qcore.plugins import get_plugin_manager
                plugins = get_plugin_manager()
            name = self.config.weight_method
            try:
                cls = plugins.get("quantizer", name)
            except Exception as exc:
                raise ValueError(f"smoothquant weight_method {name!r}: {exc}") from exc
            try:
                options = cls.Config.model_validate(self.config.weight_options)
            except Exception as exc:
                raise ValueError(f"smoothquant weight_options for {name!r}: {exc}") from exc
            self._weight_quantizer = cls(options, self._inner_scheme())
        return self._weight_quantizer

    def layer_options(self) -> dict[str, list[str]]:
        found = super().layer_options()
        if self.config.quantize:
            inner = self.weight_quantizer(None).layer_options()
            found.update({f"weight_options.{k}": v for k, v in inner.items()})
        return found

    def prepare(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        if not self.config.quantize:
            return
        kv = self.scheme.kv_cache
        if kv is not None:
            enable_kv_quantization(model, KVCacheSpec(keys=kv, values=kv))
        self.weight_quantizer(None).prepare(model, adapter)

    def finalize(self, model: nn.Module, adapter: ArchitectureAdapter) -> None:
        if self.config.quantize:
            self.weight_quantizer(None).finalize(model, adapter)

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        stats = smooth_layer(ctx, self.config.alpha, self.config.smooth_linears)
        if not self.config.quantize:
            return stats
        inner = self.weight_quantizer(ctx.plugins)
        inner_ctx = dataclasses.replace(ctx, scheme=inner.scheme)
        inner_stats = inner.quantize_layer(inner_ctx) or {}
        stats.update({f"{inner.name}.{k}": v for k, v in inner_stats.items()})
        if self.config.activation_mode == "static":
            stats.update(calibrate_static_inputs(ctx, ctx.adapter.linear_names()))
        return stats
