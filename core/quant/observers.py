"""Range observers, how each weight row's (or group's) range is picked before rounding, as
``QuantArgs.observer`` (``--observer``) selects: ``minmax``, the min and max times
``clip_ratio`` (the default, every method's published setting unless it searches its own);
``mse``, the reference GPTQ quantizer's clip search (:class:`MSEClip`, like llm-compressor's
``mse`` observer). Every weight path goes through here: RTN and ``QuantLinear.from_float``
(via :func:`qcore.quant.qparams.weight_qparams`), GPTQ's per-group parameters, AWQ's searches."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qcore.quant.qparams import args_qparams, fake_quantize
from qcore.schemes import QuantArgs


@dataclass
class MSEClip:
    """The reference quantizer's clip search: shrink factors ``p = 1 - i/grid`` for
    ``i < max_shrink * grid``, keeping per row the one minimising ``sum |Q(x) - x|^norm``."""

    grid: int = 100
    max_shrink: float = 0.8
    norm: float = 2.4


def find_params(x: torch.Tensor, args: QuantArgs, mse: MSEClip | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero (each shaped (rows, 1)) for a (rows, cols) slice: min/max
    (times ``clip_ratio``), then the MSE search when ``mse`` is given or the arguments'
    observer is ``"mse"`` (with the default search)."""
    if mse is None and args.observer == "mse":
        mse = MSEClip()
    xmin = x.amin(dim=1, keepdim=True) * args.clip_ratio
    xmax = x.amax(dim=1, keepdim=True) * args.clip_ratio
    scale, zero = args_qparams(xmin, xmax, args)
    if mse is None:
        return scale, zero
    steps = int(mse.max_shrink * mse.grid)
    best = torch.full_like(scale, float("inf"))
    # candidate shrink factors in chunks: (k, rows, cols) at a time bounds the memory
    chunk = max(1, min(steps, (1 << 24) // max(x.numel(), 1)))
    for start in range(0, steps, chunk):
        p = 1 - torch.arange(start, min(start + chunk, steps), device=x.device,
                             dtype=x.dtype).view(-1, 1, 1) / mse.grid
        s, z = args_qparams(p * xmin, p * xmax, args)
        err = (fake_quantize(x.unsqueeze(0), s, z, args.bits) - x).abs_().pow_(mse.norm)
        err = err.sum(dim=2, keepdim=True)  # (k, rows, 1)
        err_min, arg = err.min(dim=0)       # first minimum = the reference's strict "<"
        better = err_min < best
        if better.any():
            pick = arg.unsqueeze(0)
            best = torch.where(better, err_min, best)
            scale = torch.where(better, s.gather(0, pick).squeeze(0), scale)
            zero = torch.where(better, z.gather(0, pick).squeeze(0), zero)
    return scale, zero
