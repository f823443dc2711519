"""Quantization parameters and round-to-nearest quantize/dequantize, shared by every method. Every
function reduces over the last dimension (callers reshape weights to ``(rows, groups, group_size)``,
activations to ``(tokens, features)``; codes as in docs/architecture.md, "Numerical conventions").
``ste=True`` rounds with a straight-through estimator (gradient 1 through the rounding) for methods
that train through it (FlatQuant), with the same values."""

from __future__ import annotations

import torch

from qcore.schemes import QuantArgs


def qparams_from_range(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, symmetric: bool,
                       full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (float-valued, integral) zero point from a range; shapes are kept.
    Symmetric: max |x| maps to ``2^(b-1) - 1``, or to ``(2^b - 1) / 2`` with
    ``full_range`` (compressed-tensors' convention, ``QuantArgs.symmetric_range``)."""
    qmax = 2**bits - 1
    xmin = xmin.clamp(max=0)  # clamp, not minimum(): gradient 1 at the bound, as FlatQuant's
    xmax = xmax.clamp(min=0)
    if symmetric:
        half = 2 ** (bits - 1)
        absmax = torch.maximum(-xmin, xmax)
        scale = absmax.clamp(min=1e-5) / (qmax / 2 if full_range else half - 1)
        zero = torch.full_like(scale, float(half))
    else:
        scale = (xmax - xmin).clamp(min=1e-5) / qmax
        zero = torch.clamp(-torch.round(xmin / scale), 0, qmax)
    return scale, zero


def qparams_lastdim(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float = 1.0,
                    full_range: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max qparams over the last dimension (kept as size 1)."""
    xmin = x.amin(dim=-1, keepdim=True) * clip_ratio
    xmax = x.amax(dim=-1, keepdim=True) * clip_ratio
    return qparams_from_range(xmin, xmax, bits, symmetric, full_range)


def args_qparams(xmin: torch.Tensor, xmax: torch.Tensor, args: QuantArgs
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`qparams_from_range` with the bits and conventions of ``args``."""
    return qparams_from_range(xmin, xmax, args.bits, args.symmetric, args.full_range)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  ste: bool = False) -> torch.Tensor:
    """``(clamp(round(x / scale) + zero, 0, 2^b - 1) - zero) * scale``."""
    if ste:  # round(x / scale) forward, identity gradient (straight-through estimator)
        y = x / scale
        q = torch.clamp((y.round() - y).detach() + y + zero, 0, 2**bits - 1)
        return (q - zero) * scale
    q = torch.div(x, scale).round_()  # a fresh tensor: the rest works in place
    return q.add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)


def fake_quantize_minmax(x: torch.Tensor, xmin: torch.Tensor, xmax: torch.Tensor, bits: int,
                         symmetric: bool, ste: bool = False) -> torch.Tensor:
    """Fake quantization with the parameters of an observed range ``[xmin, xmax]``."""
    scale, zero = qparams_from_range(xmin, xmax, bits, symmetric)
    return fake_quantize(x, scale, zero, bits, ste)


def group_view(weight: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """Reshape a (out, in) weight so that the last dim is one quantization group."""
    out_features, in_features = weight.shape
    if args.granularity == "tensor":
        return weight.reshape(1, 1, -1)
    if args.granularity == "channel":
        return weight.reshape(out_features, 1, in_features)
    if args.granularity == "group":
        g = args.group_size
        assert g is not None
        if in_features % g:
            raise ValueError(f"group_size {g} does not divide the input features ({in_features})")
        return weight.reshape(out_features, in_features // g, g)
    raise ValueError(f"weights cannot use granularity {args.granularity!r}")


def weight_qparams(weight: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-(row, group) scale and zero of a 2-D weight, each (out, n_groups); per-tensor
    parameters are broadcast to every row (one layout for every granularity)."""
    view = group_view(weight.float(), args)
    if args.observer == "minmax":
        scale, zero = qparams_lastdim(view, args.bits, args.symmetric, args.clip_ratio,
                                      args.full_range)
    else:
        from qcore.quant.observers import find_params

        rows = view.reshape(-1, view.shape[-1])
        scale, zero = (t.reshape(*view.shape[:-1], 1) for t in find_params(rows, args))
    scale, zero = scale.squeeze(-1), zero.squeeze(-1)
    if args.granularity == "tensor":
        scale = scale.expand(weight.shape[0], 1).contiguous()
        zero = zero.expand(weight.shape[0], 1).contiguous()
    return scale, zero


def group_index(in_features: int, args: QuantArgs) -> torch.Tensor:
    """Column -> group index, in natural column order."""
    if args.granularity == "group":
        assert args.group_size is not None
        return torch.arange(in_features, dtype=torch.int32) // args.group_size
    return torch.zeros(in_features, dtype=torch.int32)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                    g_idx: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes in [0, 2**bits - 1] of a (out, in) weight under per-group parameters and
    the column -> group map, in float32 a block of rows at a time (per-column parameters of
    a whole 18944 x 3584 weight would be two more float32 copies of it, 270 MB each)."""
    rows, cols = weight.shape
    idx = g_idx.long()
    codes = torch.empty(rows, cols, dtype=torch.uint8, device=weight.device)
    step = max(1, (1 << 24) // max(cols, 1))  # 2**24 elements: 64 MB per float32 temporary
    for r in range(0, rows, step):
        block = slice(r, r + step)
        x, s, z = weight[block].float(), scale[block][:, idx], zero[block][:, idx]
        codes[block] = torch.clamp(torch.round(x / s) + z, 0, 2**bits - 1)
    return codes


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                      g_idx: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * scale`` with each column's parameters from its group, in the
    scale's float dtype (at least float32)."""
    rows, cols = codes.shape
    n_groups = scale.shape[1]
    dtype = torch.promote_types(scale.dtype, torch.float32)
    w = codes.to(dtype, copy=True)  # worked on in place below
    size = cols // n_groups
    natural = cols % n_groups == 0 and torch.equal(
        g_idx.long(), torch.arange(cols, device=g_idx.device) // size)
    if natural:  # contiguous groups: broadcast per group instead of gathering per column
        groups = w.view(rows, n_groups, size)
        groups.sub_(zero.to(dtype).unsqueeze(-1)).mul_(scale.to(dtype).unsqueeze(-1))
        return w
    idx = g_idx.long()
    return w.sub_(zero.to(dtype).index_select(1, idx)).mul_(scale.to(dtype).index_select(1, idx))


def fake_quantize_weight(weight: torch.Tensor, args: QuantArgs, ste: bool = False) -> torch.Tensor:
    """Round-to-nearest weight fake quantization (min/max range per row and group), in the
    weight's dtype: the numbers of ``QuantLinear.from_float(...).dequantize()``, computed
    on a reshaped view (searches call this hundreds of times per layer)."""
    view = group_view(weight.float(), args)
    if args.observer != "minmax":  # a searched range per row/group, then rounding
        scale, zero = weight_qparams(weight, args)
        if args.granularity == "tensor":
            scale, zero = scale[:1], zero[:1]
        out = fake_quantize(view, scale.unsqueeze(-1), zero.unsqueeze(-1), args.bits, ste)
        return out.reshape(weight.shape).to(weight.dtype)
    xmin, xmax = torch.aminmax(view, dim=-1, keepdim=True)
    if args.clip_ratio != 1.0:
        xmin, xmax = xmin * args.clip_ratio, xmax * args.clip_ratio
    out = fake_quantize_minmax(view, xmin, xmax, args.bits, args.symmetric, ste)
    return out.reshape(weight.shape).to(weight.dtype)


def fake_quantize_activation(x: torch.Tensor, args: QuantArgs,
                             static_scale: torch.Tensor | None = None,
                             static_zero: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token dynamic (over the last dim) or per-tensor static activation fake quant."""
    xf = x.float()
    if args.granularity == "token":
        scale, zero = qparams_lastdim(xf, args.bits, args.symmetric, args.clip_ratio,
                                      args.full_range)
    elif static_scale is not None and static_zero is not None:
        scale, zero = static_scale, static_zero
    elif not args.dynamic:
        raise ValueError("static per-tensor activation quantization needs a scale")
    else:
        scale, zero = args_qparams(xf.amin() * args.clip_ratio, xf.amax() * args.clip_ratio, args)
    return fake_quantize(xf, scale, zero, args.bits).to(x.dtype)
