"""RTN: min/max quantization parameters, every weight rounded to its nearest code.

Activations, when the scheme has them, are quantized per token at run time (dynamic) or
per tensor with a scale calibrated from the max |x| seen on the calibration windows."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.context import LayerContext
from qcore.interfaces import LayerNameList, Quantizer, UnsupportedScheme
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantScheme


class RTNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    skip: LayerNameList = Field(
        default_factory=list,
        description="linear names (relative to a decoder layer) left in full precision",
    )


def quantize_linears(ctx: LayerContext, names: list[str]) -> dict[str, Any]:
    """Replace the named linears of ``ctx.layer`` by RTN QuantLinears under ctx.scheme,
    calibrating static activation scales when the scheme asks for them."""
    act = ctx.scheme.activations
    absmax = ctx.input_absmax(names) if act is not None and not act.dynamic else {}
    stats: dict[str, Any] = {}
    for name in names:
        linear = ctx.submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{ctx.name}.{name} is {type(linear).__name__}, not nn.Linear")
        q = QuantLinear.from_float(linear, ctx.scheme.weights, activations=act)
        if name in absmax:
            m = absmax[name].max()
            stats[f"{name}.input_scale"] = q.set_input_range(-m, m)
        ctx.replace(name, q)
    return stats


class RTNQuantizer(Quantizer):
    name = "rtn"
    default_scheme = "W4A16"
    Config = RTNConfig
    description = "round-to-nearest with min/max ranges (baseline)"

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.kv_cache is not None:
            raise UnsupportedScheme(
                f"rtn does not quantize the KV cache (scheme {scheme.name}); use a method "
                "that does, e.g. smoothquant or flatquant"
            )

    def uses_calibration(self) -> bool:
        act = self.scheme.activations  # only static activation scales read the windows
        return act is not None and not act.dynamic

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        names = [n for n in ctx.adapter.linear_names() if n not in self.config.skip]
        return quantize_linears(ctx, names)
