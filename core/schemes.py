"""Quantization arguments and schemes, with the presets named as in the literature. Codes
are unsigned ``[0, 2**bits - 1]`` and dequantize as ``(q - zero) * scale``; each convention's
scale and zero are in docs/architecture.md, "Numerical conventions"."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Granularity = Literal["tensor", "channel", "group", "token"]


class QuantArgs(BaseModel):
    """How one kind of tensor (weights, activations or KV cache) is quantized."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bits: int = Field(ge=2, le=8, description="integer bit width")
    symmetric: bool = True
    granularity: Granularity = "channel"
    group_size: int | None = Field(default=None, gt=0)
    dynamic: bool = False
    clip_ratio: float = Field(default=1.0, gt=0.0, le=1.0,
                              description="fixed shrink of the min/max range")
    observer: Literal["minmax", "mse"] = Field(
        default="minmax", description="how each row's/group's range is chosen "
                                      "(qcore.quant.observers)")
    symmetric_range: Literal["signed", "full"] = Field(
        default="signed", description="symmetric scale: max |x| maps to 2^(b-1) - 1 (signed: "
        "SmoothQuant's, and vLLM's int8 kernels') or to (2^b - 1) / 2 (full: compressed-tensors' "
        "own fake quantization); codes are clamped to [-2^(b-1), 2^(b-1) - 1] either way")

    @model_validator(mode="after")
    def _check_group(self) -> QuantArgs:
        if self.granularity == "group" and self.group_size is None:
            raise ValueError("granularity 'group' needs group_size (e.g. 64 or 128)")
        if self.granularity != "group" and self.group_size is not None:
            raise ValueError(f"group_size={self.group_size} is only valid with granularity "
                             f"'group', not {self.granularity!r}")
        return self

    @property
    def full_range(self) -> bool:
        """Symmetric scales over (2^b - 1) / 2 (``symmetric_range == "full"``)."""
        return self.symmetric_range == "full"

    def describe(self) -> str:
        kind = "sym" if self.symmetric else "asym"
        gran = f"g{self.group_size}" if self.granularity == "group" else self.granularity
        dyn = " dynamic" if self.dynamic else ""
        obs = f" {self.observer}" if self.observer != "minmax" else ""
        return f"int{self.bits} {kind} {gran}{dyn}{obs}"


class QuantScheme(BaseModel):
    """Weights are always quantized; activations and the KV cache optionally."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    weights: QuantArgs
    activations: QuantArgs | None = None
    kv_cache: QuantArgs | None = None

    @model_validator(mode="after")
    def _check_kinds(self) -> QuantScheme:
        if self.weights.granularity == "token":
            raise ValueError("weights.granularity cannot be 'token'")
        act = self.activations
        if act is not None and act.granularity not in ("token", "tensor"):
            raise ValueError(f"activations.granularity must be 'token' or 'tensor', not "
                             f"{act.granularity!r}")
        if act is not None and act.granularity == "token" and not act.dynamic:
            raise ValueError("per-token activation quantization must be dynamic")
        kv = self.kv_cache
        if kv is not None and not kv.dynamic:
            if kv.granularity not in ("tensor", "channel"):
                raise ValueError("static kv_cache.granularity must be 'tensor' or 'channel' "
                                 f"(of the KV heads), not {kv.granularity!r}")
            if not kv.symmetric:
                raise ValueError("static kv_cache quantization must be symmetric (vLLM and "
                                 "vllm-ascend apply the scale only)")
        return self

    def with_observer(self, observer: str | None) -> QuantScheme:
        """Override the weights' range observer (None keeps the scheme as it is)."""
        return self if observer is None else self._with_weights(observer=observer)

    def with_group_size(self, group_size: int | None) -> QuantScheme:
        """Override the weight group size (None keeps the scheme as it is)."""
        if group_size is None:
            return self
        if group_size <= 0:
            raise ValueError(f"group_size must be positive, got {group_size}")
        return self._with_weights(granularity="group", group_size=group_size)

    def _with_weights(self, **update: Any) -> QuantScheme:
        """A copy with these weight arguments changed, validated as a new QuantArgs."""
        weights = QuantArgs.model_validate({**self.weights.model_dump(), **update})
        return self.model_copy(update={"weights": weights})


def _weights(bits: int, symmetric: bool, group: int | None) -> QuantArgs:
    if group is None:
        return QuantArgs(bits=bits, symmetric=symmetric, granularity="channel")
    return QuantArgs(bits=bits, symmetric=symmetric, granularity="group", group_size=group)


def _tokens(bits: int, symmetric: bool) -> QuantArgs:
    return QuantArgs(bits=bits, symmetric=symmetric, granularity="token", dynamic=True)


def _kv(bits: int) -> QuantArgs:
    # asymmetric, groups of 128 over the head dimension (the study's KV setting)
    return QuantArgs(bits=bits, symmetric=False, granularity="group", group_size=128, dynamic=True)


#: static int8 KV scales per channel, max |x| / 127: msModelSlim's C8, which vllm-ascend runs
_C8 = QuantArgs(bits=8, symmetric=True, granularity="channel")
#: one static int8 scale per tensor, max |x| / 127.5: compressed-tensors' kv_cache_scheme
#: as llm-compressor calibrates it (vLLM reads it)
_C8_TENSOR = QuantArgs(bits=8, symmetric=True, granularity="tensor", symmetric_range="full")


PRESETS: dict[str, QuantScheme] = {scheme.name: scheme for scheme in (
    QuantScheme(name="W4A16", weights=_weights(4, False, 128)),
    QuantScheme(name="W3A16", weights=_weights(3, False, 128)),
    QuantScheme(name="W8A16", weights=_weights(8, True, None)),
    QuantScheme(name="W8A8", weights=_weights(8, True, None), activations=_tokens(8, True)),
    QuantScheme(name="W4A4", weights=_weights(4, True, None), activations=_tokens(4, False)),
    QuantScheme(name="W8A8KV8", weights=_weights(8, True, None), activations=_tokens(8, True),
                kv_cache=_kv(8)),
    QuantScheme(name="W8A8C8", weights=_weights(8, True, None), activations=_tokens(8, True),
                kv_cache=_C8),
    QuantScheme(name="W8A8C8-TENSOR", weights=_weights(8, True, None),
                activations=_tokens(8, True), kv_cache=_C8_TENSOR),
    QuantScheme(name="W4A4KV4", weights=_weights(4, True, None), activations=_tokens(4, False),
                kv_cache=_kv(4)),
)}


def get_scheme(name: str, group_size: int | None = None) -> QuantScheme:
    """A preset by name (case-insensitive), with an optional weight group-size override."""
    key = name.upper()
    if key not in PRESETS:
        raise ValueError(f"unknown scheme {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[key].with_group_size(group_size)
