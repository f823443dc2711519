"""Packing of low-bit integer codes: two 4-bit (or smaller) codes per byte.

Layout: along the last dimension, column ``2j`` goes to the low nibble and ``2j+1`` to the
high nibble of byte ``j``. An odd last dimension is padded with a zero code.
"""

from __future__ import annotations

import torch


def packed_width(columns: int, bits: int) -> int:
    return (columns + 1) // 2 if bits <= 4 else columns


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 storage of unsigned codes in [0, 2**bits - 1]; 2 per byte when bits <= 4."""
    if codes.numel() and (codes.min() < 0 or codes.max() > 2**bits - 1):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed to {bits} bits")
    q = codes.to(torch.uint8)
    if bits > 4:
        return q.contiguous()
    if q.shape[-1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    low, high = q[..., 0::2], q[..., 1::2]
    return (low | (high << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns uint8 codes with ``columns`` columns."""
    if bits > 4:
        return packed[..., :columns]
    low = packed & 0x0F
    high = packed >> 4
    out = torch.stack((low, high), dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :columns]
