"""Non-finite numbers caught where they appear: in source weights, in a layer's outputs."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from qcore.errors import NonFiniteError

#: elements checked at once: the check's temporaries stay small for a 151936-row embedding
_CHUNK = 1 << 24
#: what a non-finite source weight means, for the errors that name one
CORRUPT_SOURCE = ("the checkpoint is corrupt or was saved after a diverged training step; "
                  "nothing was quantized")


def is_finite(t: torch.Tensor, after_chunk: Callable[[torch.Tensor], object] | None = None) -> bool:
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
    first = torch.nonzero(~torch.isfinite(t))[0].tolist()
    return f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf (first at {first})"


def nonfinite_tensors(module: nn.Module) -> dict[str, str]:
    """name -> description of every parameter/buffer holding NaN or inf."""
    return {name: problem for name, t in [*module.named_parameters(), *module.named_buffers()]
            if t.device.type != "meta" and (problem := describe_nonfinite(t.detach()))}


def check_source_weights(model: nn.Module) -> None:
    """Refuse a model whose float weights hold NaN/inf before any quantization."""
    bad = nonfinite_tensors(model)
    if bad:
        name, problem = next(iter(bad.items()))
        more = f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise NonFiniteError(f"source weight {name} holds {problem}{more}: {CORRUPT_SOURCE}")


def all_finite(tensors: Iterable[torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def nonfinite_cause(name: str, method: str, layer: nn.Module, inputs: Sequence[torch.Tensor],
                     reference: Sequence[torch.Tensor]) -> str:
    """Why a layer's quantized outputs hold NaN/inf, with advice that fits the cause."""
    where = f"{name}: the quantized layer's outputs hold NaN/inf"
    if not all_finite(inputs):
        return (f"{where} because its inputs already do (an earlier layer or the embeddings "
                "produced them)")
    if not all_finite(reference):
        dtype = next(layer.parameters()).dtype
        return (f"{where}, and so do the float layer's on the same inputs ({dtype}): the "
                "model overflows on this calibration data; run in float32")
    bad = nonfinite_tensors(layer)
    if bad:
        listed = "; ".join(f"{t}: {d}" for t, d in list(bad.items())[:3])
        return (f"{where}: {method} wrote non-finite values into {listed}. The float layer is "
                "finite on the same inputs, so the method's solver diverged: change its options "
                "(`qcore list-plugins` names them; e.g. a larger dampening or a lower learning "
                "rate)")
    return (f"{where} although its weights and the float layer's outputs are finite: the "
            f"activation quantization or an online transform of {method} overflowed")
