"""KV-cache fake quantization inside attention, after RoPE: the ``qcore_kv`` attention
implementation qcore registers with transformers runs each attention module's ``qcore_kv``
submodule (a :class:`KVCacheQuantizer`) on the query, key and value states (keys after RoPE,
as they are cached), then PyTorch's SDPA. A quantizer enables it with
:func:`enable_kv_quantization`; the qcore format re-enables it on load.

Dynamic (the study's ``W8A8KV8``/``W4A4KV4``): keys and values are quantized per token and
head, asymmetric, in groups over the head dimension; an optional ``key_transform`` (e.g.
FlatQuant's learned head_dim transform) applies to keys, its inverse transpose to queries,
leaving q k^T unchanged in exact arithmetic. Static (what serving engines store,
``W8A8C8``/``W8A8C8-TENSOR``): symmetric scales, one per tensor or per KV channel
(msModelSlim's C8), fixed at calibration (:func:`kv_calibration`) from the absolute maxima
of the post-RoPE keys and values: the quantizer's ``key_scale``/``value_scale`` buffers."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qcore.quant.linear import TransformSpec, build_transform
from qcore.quant.qparams import args_qparams, fake_quantize, qparams_lastdim
from qcore.schemes import QuantArgs

ATTN_IMPLEMENTATION = "qcore_kv"


class KVCacheSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: QuantArgs | None
    values: QuantArgs | None
    key_transform: TransformSpec | None = None
    #: shape of the static scales: [1] per tensor, [num_kv_heads, head_dim] per channel
    scale_shape: list[int] | None = None

    @property
    def static(self) -> bool:
        return any(a is not None and not a.dynamic for a in (self.keys, self.values))


def fake_quantize_heads(x: torch.Tensor, args: QuantArgs, ste: bool = False) -> torch.Tensor:
    """Fake-quantize (batch, heads, tokens, head_dim) per token/head in head-dim groups
    (``ste``: straight-through rounding, for training through it)."""
    head_dim = x.shape[-1]
    group = min(args.group_size or head_dim, head_dim) if args.granularity == "group" \
        else head_dim
    if head_dim % group:
        raise ValueError(f"KV group size {group} does not divide head_dim {head_dim}")
    view = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    scale, zero = qparams_lastdim(view, args.bits, args.symmetric, args.clip_ratio, args.full_range)
    return fake_quantize(view, scale, zero, args.bits, ste).reshape(x.shape).to(x.dtype)


class KVCacheQuantizer(nn.Module):
    """Attached to an attention module as ``qcore_kv``. A static spec holds the ``key_scale``/
    ``value_scale`` buffers (NaN until calibrated: using them before is an error)."""

    def __init__(self, spec: KVCacheSpec, key_transform: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.key_transform = key_transform
        self.enabled = True
        self.calibrating = False
        self._absmax: dict[str, torch.Tensor] = {}
        #: the static scales were found calibrated (checked on first use, after a load)
        self._scales_checked = False
        if spec.static:
            if spec.scale_shape is None:
                raise ValueError("a static KV-cache spec needs scale_shape")
            if spec.key_transform is not None:
                raise ValueError("static KV-cache scales with a key transform are not supported")
            for role in ("key", "value"):
                self.register_buffer(f"{role}_scale", torch.full(spec.scale_shape, float("nan")))

    def _observe(self, role: str, x: torch.Tensor) -> None:
        a = x.detach().float().abs()
        m = a.amax().reshape(1) if self.spec.scale_shape == [1] else a.amax(dim=(0, 2))
        old = self._absmax.get(role)
        self._absmax[role] = m if old is None else torch.maximum(old, m)

    def finish_calibration(self) -> dict[str, torch.Tensor]:
        """Set the static scales from the observed maxima; returns them by role."""
        out = {}
        for role, args in (("key", self.spec.keys), ("value", self.spec.values)):
            if args is None or args.dynamic:
                continue
            if role not in self._absmax:
                raise RuntimeError("KV-cache calibration observed no keys/values: did the "
                                   "layer run inside kv_calibration()?")
            m = self._absmax[role]
            scale, _ = args_qparams(-m, m, args)
            getattr(self, f"{role}_scale").copy_(scale.reshape(self.spec.scale_shape))
            out[role] = scale
        self._absmax = {}
        self._scales_checked = True
        return out

    def _quantize(self, role: str, x: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
        if args is None:
            return x
        if args.dynamic:
            return fake_quantize_heads(x, args)
        if not self._scales_checked:  # once: the check syncs with the device
            for r in ("key", "value"):
                if torch.isnan(getattr(self, f"{r}_scale")).any():
                    raise RuntimeError(f"static KV-cache {r} scales were never calibrated "
                                       "(calibrate inside qcore.quant.kvcache.kv_calibration)")
            self._scales_checked = True
        # a fixed symmetric scale of shape [1] or [heads, head_dim] over (b, heads, t, d)
        scale = getattr(self, f"{role}_scale").float()
        s = scale if scale.dim() == 1 else scale[:, None, :]
        zero = torch.full_like(s, float(2 ** (args.bits - 1)))
        return fake_quantize(x.float(), s, zero, args.bits).to(x.dtype)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.key_transform is not None:
            query, key = self.key_transform(query, key)
        if self.calibrating:
            self._observe("key", key)
            self._observe("value", value)
        if self.calibrating or not self.enabled:
            return query, key, value
        return (query, self._quantize("key", key, self.spec.keys),
                self._quantize("value", value, self.spec.values))


@contextmanager
def kv_calibration(quantizers: list[KVCacheQuantizer]) -> Iterator[None]:
    """Forwards inside observe the keys and values (unquantized) of ``quantizers``; on
    leaving, their static scales are set from the observed maxima."""
    for q in quantizers:
        q.calibrating = True
    try:
        yield
    finally:
        for q in quantizers:
            q.calibrating = False
    for q in quantizers:
        q.finish_calibration()


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "qcore_kv", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def spec_for(keys: QuantArgs | None, values: QuantArgs | None, num_kv_heads: int,
             head_dim: int) -> KVCacheSpec:
    """A KVCacheSpec for one attention module: static scales shaped [1] per tensor,
    [num_kv_heads, head_dim] per channel."""
    static = next((a for a in (keys, values) if a is not None and not a.dynamic), None)
    shapes = {"tensor": [1], "channel": [num_kv_heads, head_dim]}
    if static is not None and static.granularity not in shapes:
        raise ValueError(f"static KV-cache quantization is per 'tensor' or 'channel', not "
                         f"{static.granularity!r}")
    shape = shapes[static.granularity] if static is not None else None
    return KVCacheSpec(keys=keys, values=values, scale_shape=shape)


def kv_layout(config: Any) -> tuple[int, int]:
    """(num_kv_heads, head_dim) from a transformers decoder config."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(heads), int(head_dim)


def attach_static_kv(model: nn.Module, args: QuantArgs,
                     scales: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Static KV-cache quantizers with the given (key, value) scales ([1] or [num_kv_heads,
    head_dim]) on the named attention modules (what a serving format's reader rebuilds)."""
    heads, head_dim = kv_layout(model.config)
    for name, (key, value) in scales.items():
        attn = model.get_submodule(name)
        quantizer = KVCacheQuantizer(spec_for(args, args, heads, head_dim))
        quantizer.key_scale.copy_(key.float().reshape(quantizer.key_scale.shape))
        quantizer.value_scale.copy_(value.float().reshape(quantizer.value_scale.shape))
        # a bias-free attention of QuantLinears holds buffers only
        device = next(itertools.chain(attn.parameters(), attn.buffers())).device
        attn.qcore_kv = quantizer.to(device)
    use_kv_attention(model)


def use_kv_attention(model: nn.Module) -> None:
    """Route the model's attention through ``qcore_kv`` (plain SDPA without a quantizer)."""
    register_attention()
    model.set_attn_implementation(ATTN_IMPLEMENTATION)


@functools.cache  # once per process
def register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules (those with k_proj and v_proj) by qualified name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj")}


def enable_kv_quantization(model: nn.Module, spec: KVCacheSpec,
                           key_transforms: dict[str, nn.Module] | None = None) -> int:
    """Attach a KVCacheQuantizer to every attention module and switch the model to the
    ``qcore_kv`` attention implementation. Returns the number of modules patched."""
    modules = attention_modules(model)
    for name, attn in modules.items():
        attn.qcore_kv = KVCacheQuantizer(spec, key_transform=(key_transforms or {}).get(name))
    use_kv_attention(model)
    return len(modules)


def kv_quantizers(model: nn.Module) -> dict[str, KVCacheQuantizer]:
    """Each attention module's KV-cache quantizer, by the attention module's name."""
    return {name: m.qcore_kv for name, m in attention_modules(model).items()
            if isinstance(getattr(m, "qcore_kv", None), KVCacheQuantizer)}


def restore_kv_quantization(model: nn.Module, specs: dict[str, dict],
                            modules: dict[str, type[nn.Module]]) -> None:
    """Rebuild KVCacheQuantizers from saved specs (before the tensors are loaded)."""
    if not specs:
        return
    for name, raw in specs.items():
        spec = KVCacheSpec.model_validate(raw)
        transform = build_transform(spec.key_transform, modules, f"{name}.qcore_kv")
        model.get_submodule(name).qcore_kv = KVCacheQuantizer(spec, key_transform=transform)
    use_kv_attention(model)
