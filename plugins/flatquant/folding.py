"""Folding a decoder layer's trained FlatQuant learnables into deployable linears.

After training, the inverse transforms, clipping and scales are folded into the float
weights in float64 (the weight solver then quantizes them to QuantLinear codes); the
Kronecker transforms stay online as each QuantLinear's ``input_transform``, the key
transform as the KV-cache quantizer's.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import nn

from qcore.schemes import QuantArgs
from qcore_flatquant.learnables import LayerTransforms
from qcore_flatquant.transforms import FlatQuantKeyTransform, FlatQuantTransform, decompose_dim


@torch.no_grad()
def fold_layer(layer: nn.Module, owner: LayerTransforms, norms: tuple[str, str],
               act: QuantArgs | None, clip: bool = True
               ) -> tuple[dict[str, FlatQuantTransform], FlatQuantKeyTransform | None]:
    """Fold the learned transforms into ``layer`` in float64, in place.

    Linear weights become ``clip(W diag(1/c) P^-T)`` (v_proj's rows times ``P_v``, up_proj's
    rows times down's scale), the norms absorb the q/k/v and gate/up scales. Returns the
    online transform per linear name (Kronecker matrices + learned activation clip) and the
    key-cache transform (or None)."""
    m = owner.mats(torch.float64)
    names = owner.names
    transforms: dict[str, FlatQuantTransform] = {}
    clip_mode = "none" if act is None or not clip or not owner.config.lac \
        else owner.variant.transform_clip(act)
    for role, name in names.items():
        linear = layer.get_submodule(name)
        dtype = linear.weight.dtype
        w = linear.weight.detach().double()
        b = None if linear.bias is None else linear.bias.detach().double()
        w, b = owner.transform_weight(role, name, w, b, m, clip=clip)
        if role == "up" and m["down"]["c"] is not None:
            w = w * m["down"]["c"].unsqueeze(1)
            if b is not None:
                b = b * m["down"]["c"]
        linear.weight.data = w.to(dtype)
        if b is not None:
            linear.bias.data = b.to(dtype)
        tr = _online_transform(owner, role, m, linear.in_features, clip_mode)
        if clip_mode != "none":
            cmin, cmax = owner.act_clip(name)
            tr.clip_min.copy_(cmin)
            tr.clip_max.copy_(cmax)
        transforms[name] = tr.to(linear.weight.device)
    for norm_name, group in zip(norms, ("ln", "up"), strict=True):
        c = m[group]["c"]
        if c is None:
            continue
        norm = layer.get_submodule(norm_name)
        norm.weight.data = (norm.weight.detach().double() * c).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.detach().double() * c).to(norm.bias.dtype)
    key = None
    if owner.k is not None:
        key = FlatQuantKeyTransform(owner.head_dim)
        key.matrix.copy_(m["k"])
        key.matrix_inv_t.copy_(m["k_it"])
        key = key.to(owner.k.matrix.device)
    return transforms, key


def _online_transform(owner: LayerTransforms, role: str, m: dict[str, Any], in_features: int,
                      clip_mode: Literal["none", "sym", "asym"]) -> FlatQuantTransform:
    """The online transform of a linear of ``role``: its group's Kronecker matrices, the
    head transform for o_proj, or the identity over FlatQuant's factorization of its inputs
    for o_proj without one."""
    if role == "o" and owner.o is None:
        return FlatQuantTransform(*decompose_dim(in_features), clip=clip_mode)
    if role == "o":
        tr = FlatQuantTransform(owner.num_heads, owner.head_dim, has_right=False,
                                clip=clip_mode)
        tr.left.copy_(m["o"])
        return tr
    g = m[owner.group(role)]
    tr = FlatQuantTransform(g["L"].shape[0], g["R"].shape[0], clip=clip_mode)
    tr.left.copy_(g["L"])
    tr.right.copy_(g["R"])
    return tr
