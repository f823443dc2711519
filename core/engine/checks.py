"""Checks the engine makes before and during a run, with messages that say what to change."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from qcore.engine.finite import all_finite, nonfinite_tensors
from qcore.models.adapter import ArchitectureAdapter
from qcore.schemes import QuantScheme


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
        return (f"{where}: {method} wrote non-finite values into {listed}. The float layer "
                f"is finite on the same inputs, so the method's solver diverged: change its "
                f"options (`qcore list-plugins` names them; e.g. a larger dampening or a "
                f"lower learning rate)")
    return (f"{where} although its weights and the float layer's outputs are finite: the "
            f"activation quantization or an online transform of {method} overflowed")


def check_group_size(model: nn.Module, adapter: ArchitectureAdapter, scheme: QuantScheme) -> None:
    """Fail before any work if the weight group size does not divide a layer's inputs."""
    g = scheme.weights.group_size
    if scheme.weights.granularity != "group" or g is None:
        return
    bad: dict[str, list[str]] = {}
    common = 0
    for i, layer in enumerate(adapter.decoder_layers()):
        for name in adapter.linear_names():
            in_features = layer.get_submodule(name).in_features
            common = math.gcd(common, in_features)
            if in_features % g:
                bad.setdefault(f"{name} ({in_features})", []).append(str(i))
    if bad:
        where = "; ".join(f"{adapter.layer_prefix(int(ids[0])).rsplit('.', 1)[0]}."
                          f"{{{ids[0]}..{ids[-1]}}}.{name}" for name, ids in bad.items())
        fits = 1
        while fits * 2 <= g and common % (fits * 2) == 0:
            fits *= 2
        raise ValueError(
            f"`group_size` {g} does not divide the input features of: {where}. "
            f"The largest power of two below it that divides every layer is {fits}: "
            f"pass `group_size` {fits}."
        )
