"""AWQ's numerical pieces: fake quantization, the scale grid, scale folding, clip search.

Everything here works on plain tensors and modules so that each step can be tested on its
own; :mod:`qcore_awq.quantizer` wires them into the layer-wise pipeline.

Conventions follow llm-awq (awq/quantize/auto_scale.py, auto_clip.py):

* ``s_x`` is the mean of ``|x|`` per input channel over the calibration tokens.
* For a ratio ``r`` the candidate scale is ``s = clamp(s_x ** r, min=1e-4)`` divided by
  ``sqrt(max(s) * min(s))``; the group's weights become ``Q(W diag(s)) diag(s)^-1``.
* The clip search shrinks each (row, group)'s ``max |w|`` by ``1 - i / n_grid`` for
  ``i < max_shrink * n_grid`` and clamps the weights to ``[-max, max]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import QuantArgs

# ----------------------------------------------------------------------------- quantizer


def fake_quant(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Round-to-nearest fake quantization of a 2-D weight, float32 out (the numbers of
    ``QuantLinear.from_float(...).dequantize()``)."""
    return fake_quantize_weight(weight.float(), args)


def group_columns(in_features: int, args: QuantArgs) -> int:
    """Columns per quantization group (the whole row for per-channel weights)."""
    if args.granularity == "group":
        assert args.group_size is not None
        return args.group_size
    return in_features


# ----------------------------------------------------------------------------- scale grid


def candidate_scale(s_x: torch.Tensor, ratio: float) -> torch.Tensor:
    """``s_x ** ratio`` clamped at 1e-4 and normalised by ``sqrt(max * min)``."""
    s = s_x.float().pow(ratio).clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_quantized(weight: torch.Tensor, s: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """``Q(W diag(s)) diag(s)^-1`` in float32: what the folded, quantized weight computes
    on the unscaled input."""
    s = s.float().view(1, -1)
    return fake_quant(weight.float() * s, args).div_(s)


Scorer = Callable[[list[torch.Tensor]], float]


@dataclass
class ScaleResult:
    """The outcome of one group's grid search."""

    scale: torch.Tensor
    ratio: float
    error_before: float  # r = 0: plain round-to-nearest of the group's linears
    error_after: float  # the best ratio's error
    history: list[float] = field(default_factory=list)


def search_scale(
    s_x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    score: Scorer,
    args: QuantArgs,
    n_grid: int = 20,
) -> ScaleResult:
    """Try ``r = i / n_grid`` for ``i = 0 .. n_grid - 1`` and keep the first best.

    ``score`` receives the candidate float32 weights of the group's linears (each
    ``Q(W s) / s``) and returns the mean squared error of the block output."""
    best: tuple[float, float, torch.Tensor] | None = None
    history: list[float] = []
    for i in range(n_grid):
        ratio = i / n_grid
        s = candidate_scale(s_x, ratio)
        err = float(score([scaled_quantized(w, s, args) for w in weights]))
        history.append(err)
        if best is None or err < best[0]:
            best = (err, ratio, s)
    if best is None or not torch.isfinite(torch.tensor(best[0])):
        raise FloatingPointError(f"AWQ scale search found no finite error: {history}")
    err, ratio, s = best
    return ScaleResult(scale=s, ratio=ratio, error_before=history[0], error_after=err,
                       history=history)


class GramScorer:
    """Output MSE of a single linear from the Gram matrix of its inputs.

    ``mean over tokens and rows of (x . (W' - W)_r)^2 = sum_r d_r^T G d_r / (N * rows)``
    with ``G = sum x x^T``: the same number as running the linear on every cached token,
    at a cost independent of the token count."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor, tokens: int) -> None:
        self.weight = weight.float()
        self.gram = gram.float()
        self.tokens = tokens

    def __call__(self, candidates: list[torch.Tensor]) -> float:
        (cand,) = candidates
        delta = cand - self.weight
        total = ((delta @ self.gram) * delta).sum(dtype=torch.float64)
        return float(total) / (self.tokens * self.weight.shape[0])


class BlockScorer:
    """Output MSE of a block (attention, MLP...) replayed on its recorded calls.

    ``calls`` are the ``(args, kwargs)`` the decoder layer passed to the block; the
    reference outputs are computed once with the current (float) weights."""

    def __init__(self, block: nn.Module, linears: Sequence[nn.Linear],
                 calls: list[tuple[tuple, dict]]) -> None:
        self.block = block
        self.linears = list(linears)
        self.calls = calls
        self.reference = [self._run(a, k) for a, k in calls]
        self.numel = sum(r.numel() for r in self.reference)

    def _run(self, args: tuple, kwargs: dict) -> torch.Tensor:
        out = self.block(*args, **kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    @torch.no_grad()
    def __call__(self, candidates: list[torch.Tensor]) -> float:
        originals = [lin.weight.data for lin in self.linears]
        try:
            for lin, cand in zip(self.linears, candidates, strict=True):
                lin.weight.data = cand.to(lin.weight.dtype)
            total = 0.0
            for (a, k), ref in zip(self.calls, self.reference, strict=True):
                diff = self._run(a, k).float() - ref.float()
                total += float(diff.pow(2).sum(dtype=torch.float64))
        finally:
            for lin, w in zip(self.linears, originals, strict=True):
                lin.weight.data = w
        return total / self.numel


# ----------------------------------------------------------------------------- folding


# ----------------------------------------------------------------------------- clipping


@dataclass
class ClipResult:
    max_val: torch.Tensor  # (rows, n_groups): the chosen clamp bound per row and group
    error_before: float  # summed over rows and groups, no clipping
    error_after: float  # summed over rows and groups, chosen clipping
    mean_shrink: float  # mean of 1 - max_val / original max


@torch.no_grad()
def search_clip(
    weight: torch.Tensor,
    x: torch.Tensor,
    args: QuantArgs,
    n_grid: int = 20,
    max_shrink: float = 0.5,
    batch_rows: int = 256,
) -> ClipResult:
    """Per (output row, group), the clamp bound ``max|w| * (1 - i / n_grid)`` for
    ``i < max_shrink * n_grid`` minimising ``mean_t (x_t,g . (Q(clamp(w_g)) - w_g))^2``
    on the token sample ``x`` (tokens, in_features). ``i = 0`` (no clipping) is always a
    candidate, so the chosen error never exceeds the unclipped one."""
    w_all = weight.float()
    rows, cols = w_all.shape
    gs = group_columns(cols, args)
    n_groups = cols // gs
    xg = x.float().reshape(-1, n_groups, gs).permute(1, 0, 2)  # (G, T, gs)
    steps = max(1, int(max_shrink * n_grid))
    best_all, before_all, after_all = [], 0.0, 0.0
    for start in range(0, rows, batch_rows):
        w = w_all[start: start + batch_rows].reshape(-1, n_groups, gs)  # (R, G, gs)
        org_max = w.abs().amax(dim=-1, keepdim=True)  # (R, G, 1)
        best_max = org_max.clone()
        min_err = torch.full_like(org_max, float("inf"))
        before = None
        for i in range(steps):
            max_val = org_max * (1 - i / n_grid)
            cur = torch.clamp(w, -max_val, max_val)
            q = fake_quant(cur.reshape(w.shape[0], cols), args).reshape(w.shape)
            delta = (q - w).permute(1, 2, 0)  # (G, gs, R)
            out = torch.bmm(xg, delta)  # (G, T, R)
            err = out.pow(2).mean(dim=1).transpose(0, 1).unsqueeze(-1)  # (R, G, 1)
            if before is None:
                before = float(err.sum(dtype=torch.float64))
            better = err < min_err
            min_err = torch.where(better, err, min_err)
            best_max = torch.where(better, max_val, best_max)
        best_all.append(best_max.squeeze(-1))
        before_all += before or 0.0
        after_all += float(min_err.sum(dtype=torch.float64))
        del org_max
    best = torch.cat(best_all, dim=0)
    org = w_all.reshape(rows, n_groups, gs).abs().amax(dim=-1)
    shrink = float((1 - best / org.clamp(min=1e-30)).mean())
    return ClipResult(max_val=best, error_before=before_all, error_after=after_all,
                      mean_shrink=shrink)


@torch.no_grad()
def apply_clip(linear: nn.Linear, max_val: torch.Tensor, args: QuantArgs) -> None:
    """Clamp each (row, group) of ``linear.weight`` to ``[-max_val, max_val]``."""
    w = linear.weight
    rows, cols = w.shape
    gs = group_columns(cols, args)
    view = w.data.reshape(rows, cols // gs, gs)
    bound = max_val.to(w).unsqueeze(-1)
    linear.weight.data = torch.clamp(view, -bound, bound).reshape(rows, cols)
