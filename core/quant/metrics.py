"""Error measures shared by the engine and the evaluators."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def relative_mse(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """||out - ref||^2 / ||ref||^2 over the batches of ``ref`` (``out`` may have more batches)."""
    pairs = zip(ref, out[:len(ref)], strict=True)
    num = sum(float((o.float() - r.float()).pow(2).sum()) for r, o in pairs)
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / max(den, 1e-30)
