"""Folding a per-channel scale into a layer without changing what it computes."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


@torch.no_grad()
def fold_scale(prev: nn.Module, linears: Sequence[nn.Linear], s: torch.Tensor, kind: str) -> None:
    """Fold ``s`` exactly (in exact arithmetic): the producer's output channels are divided
    by ``s`` (a norm's weight and bias, ``kind="norm"``, or a linear's output rows and bias,
    ``kind="linear"``) and the consumers' input columns multiplied by it. Used by every
    smoothing method (AWQ's searched scales, SmoothQuant's migration factors)."""
    if kind == "norm":
        weight = getattr(prev, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != s.shape:
            raise ValueError(f"cannot fold a scale of {tuple(s.shape)} into {type(prev).__name__}: "
                             f"its weight is {None if weight is None else tuple(weight.shape)}")
        weight.div_(s.to(weight))
        bias = getattr(prev, "bias", None)
        if isinstance(bias, torch.Tensor):
            bias.div_(s.to(bias))
    elif kind == "linear":
        if not isinstance(prev, nn.Linear) or prev.out_features != s.numel():
            raise ValueError(f"cannot fold a scale of {s.numel()} channels into the rows of "
                             f"{type(prev).__name__} "
                             f"{getattr(prev, 'weight', torch.empty(0)).shape}")
        prev.weight.div_(s.to(prev.weight).view(-1, 1))
        if prev.bias is not None:
            prev.bias.div_(s.to(prev.bias))
    else:
        raise ValueError(f"unknown group kind {kind!r}")
    for lin in linears:
        lin.weight.mul_(s.to(lin.weight).view(1, -1))
