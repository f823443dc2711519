"""KV-cache fake quantization inside attention, after RoPE.

qcore registers an attention implementation named ``qcore_kv`` with transformers. It runs
each attention module's ``qcore_kv`` submodule (a :class:`KVCacheQuantizer`) on the
query, key and value states (keys after RoPE, as they would be cached) and then calls
PyTorch's scaled-dot-product attention. A quantizer enables it with
:func:`enable_kv_quantization`; the qcore save format records the specs and re-enables it
on load.

Keys and values are quantized per token and head, in groups over the head dimension
(group size capped at ``head_dim``), asymmetric by default (the study's KV setting). An
optional ``key_transform`` module (e.g. FlatQuant's learned head_dim transform) is applied
to keys, and its inverse transpose to queries, before quantization, leaving q k^T unchanged
in exact arithmetic.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from qcore.quant.linear import TransformSpec, build_transform
from qcore.quant.qparams import fake_quantize, qparams_lastdim
from qcore.schemes import QuantArgs

ATTN_IMPLEMENTATION = "qcore_kv"
_registered = False


class KVCacheSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    keys: QuantArgs | None
    values: QuantArgs | None
    key_transform: TransformSpec | None = None


def fake_quantize_heads(x: torch.Tensor, args: QuantArgs, ste: bool = False) -> torch.Tensor:
    """Fake-quantize (batch, heads, tokens, head_dim) per token/head in head-dim groups
    (``ste``: straight-through rounding, for training through it)."""
    head_dim = x.shape[-1]
    group = min(args.group_size or head_dim, head_dim) if args.granularity == "group" \
        else head_dim
    if head_dim % group:
        raise ValueError(f"KV group size {group} does not divide head_dim {head_dim}")
    view = x.float().reshape(*x.shape[:-1], head_dim // group, group)
    scale, zero = qparams_lastdim(view, args.bits, args.symmetric, args.clip_ratio,
                                  args.full_range)
    return fake_quantize(view, scale, zero, args.bits, ste).reshape(x.shape).to(x.dtype)


class KVCacheQuantizer(nn.Module):
    """Attached to an attention module as ``qcore_kv``."""

    def __init__(self, spec: KVCacheSpec, key_transform: nn.Module | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.key_transform = key_transform
        self.enabled = True

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.key_transform is not None:
            query, key = self.key_transform(query, key)
        if not self.enabled:
            return query, key, value
        if self.spec.keys is not None:
            key = fake_quantize_heads(key, self.spec.keys)
        if self.spec.values is not None:
            value = fake_quantize_heads(value, self.spec.values)
        return query, key, value


def _attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: torch.Tensor | None, **kwargs: Any):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    kv = getattr(module, "qcore_kv", None)
    if kv is not None:
        query, key, value = kv(query, key, value)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention() -> None:
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
    _registered = True


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Attention modules (those with k_proj and v_proj) by qualified name."""
    return {name: m for name, m in model.named_modules()
            if hasattr(m, "k_proj") and hasattr(m, "v_proj")}


def enable_kv_quantization(model: nn.Module, spec: KVCacheSpec,
                           key_transforms: dict[str, nn.Module] | None = None) -> int:
    """Attach a KVCacheQuantizer to every attention module and switch the model to the
    ``qcore_kv`` attention implementation. Returns the number of modules patched."""
    register_attention()
    modules = attention_modules(model)
    for name, attn in modules.items():
        transform = (key_transforms or {}).get(name)
        attn.qcore_kv = KVCacheQuantizer(spec, key_transform=transform)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return len(modules)


def kv_specs(model: nn.Module) -> dict[str, dict]:
    """What the save format records: attention module name -> KVCacheSpec."""
    return {name: m.qcore_kv.spec.model_dump(mode="json")
            for name, m in attention_modules(model).items()
            if isinstance(getattr(m, "qcore_kv", None), KVCacheQuantizer)}


def restore_kv_quantization(model: nn.Module, specs: dict[str, dict],
                            modules: dict[str, type[nn.Module]]) -> None:
    """Rebuild KVCacheQuantizers from saved specs (before the tensors are loaded)."""
    if not specs:
        return
    register_attention()
    for name, raw in specs.items():
        spec = KVCacheSpec.model_validate(raw)
        transform = build_transform(spec.key_transform, modules, f"{name}.qcore_kv")
        model.get_submodule(name).qcore_kv = KVCacheQuantizer(spec, key_transform=transform)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
