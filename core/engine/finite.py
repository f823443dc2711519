"""Non-finite numbers caught where they appear: in source weights, in a layer's outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from qcore.errors import NonFiniteError

#: elements checked at once: the check's temporaries stay small for a 151936-row embedding
_CHUNK = 1 << 24


def is_finite(t: torch.Tensor,
              after_chunk: Callable[[torch.Tensor], object] | None = None) -> bool:
    """Whether every element is finite, checked a chunk at a time; ``after_chunk`` gets
    each chunk checked (e.g. to drop its pages)."""
    flat = t.reshape(-1)
    for i in range(0, flat.numel(), _CHUNK):
        chunk = flat[i: i + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            return False
        if after_chunk is not None:
            after_chunk(chunk)
    return True


def describe_nonfinite(t: torch.Tensor) -> str | None:
    """'3 NaN, 1 inf (first at [12, 40])' for a tensor with non-finite values, else None."""
    if not t.is_floating_point() or is_finite(t):
        return None
    nan = int(torch.isnan(t).sum())
    inf = int(torch.isinf(t).sum())
    first = torch.nonzero(~torch.isfinite(t))[0].tolist()
    return f"{nan} NaN, {inf} inf (first at {first})"


def nonfinite_tensors(module: nn.Module) -> dict[str, str]:
    """name -> description of every parameter/buffer holding NaN or inf."""
    found = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        if t.device.type == "meta":
            continue
        problem = describe_nonfinite(t.detach())
        if problem:
            found[name] = problem
    return found


def check_source_weights(model: nn.Module) -> None:
    """Refuse a model whose float weights hold NaN/inf before any quantization."""
    bad = nonfinite_tensors(model)
    if bad:
        name, problem = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteError(f"source weight {name} holds {problem}{more}: the checkpoint is "
                             "corrupt or was saved after a diverged training step; nothing "
                             "was quantized")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)
