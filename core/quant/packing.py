"""Packing of low-bit integer codes: two 4-bit (or smaller) codes per byte, along the last
dimension column ``2j`` in the low nibble and ``2j+1`` in the high nibble of byte ``j`` (an
odd last dimension is padded with a zero code); and dense bit packing into int32 words."""

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
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()  # low nibble: even column


def unpack_codes(packed: torch.Tensor, bits: int, columns: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`; returns uint8 codes with ``columns`` columns."""
    if bits > 4:
        return packed[..., :columns]
    out = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)
    return out[..., :columns]


def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Dense little-endian bit packing of unsigned ``bits``-bit codes into int32 words along ``dim``
    of a 2-D tensor: element ``i`` occupies bits ``[i*bits, (i+1)*bits)`` of the row's bit stream,
    straddling two words where it must; the last word is padded with zeros. (compressed-tensors
    0.20's ``pack_to_int32`` layout for its offset codes, which are qcore's unsigned codes.)"""
    if codes.ndim != 2:
        raise ValueError(f"pack_int32 takes a 2-D tensor, got shape {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32 packs 1..8-bit codes, not {bits}")
    values = (codes.transpose(0, 1) if dim == 0 else codes).to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() >= 2**bits):
        raise ValueError(f"codes outside [0, {2**bits - 1}] cannot be packed to {bits} bits")
    rows, cols = values.shape
    words = -(-cols * bits // 32)
    start = torch.arange(cols, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    out = torch.zeros(rows, words + 1, dtype=torch.int64)
    out.scatter_add_(1, word.expand(rows, -1), (values << offset) & 0xFFFFFFFF)
    spill = offset + bits > 32  # the high bits that continue in the next word
    if spill.any():
        out.scatter_add_(1, (word[spill] + 1).expand(rows, -1),
                         values[:, spill] >> (32 - offset[spill]))
    out = out[:, :words]
    out = torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)
    return (out.transpose(0, 1) if dim == 0 else out).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: uint8 codes with ``length`` elements along ``dim``."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"unpack_int32 takes a 2-D int32 tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)}")
    words = (packed.transpose(0, 1) if dim == 0 else packed).to(torch.int64) & 0xFFFFFFFF
    if -(-length * bits // 32) != words.shape[1]:
        raise ValueError(f"{words.shape[1]} int32 words cannot hold exactly {length} "
                         f"{bits}-bit codes")
    start = torch.arange(length, dtype=torch.int64) * bits
    word, offset = start // 32, start % 32
    padded = torch.nn.functional.pad(words, (0, 1))
    both = padded[:, word] | (padded[:, word + 1] << 32)  # two words cover any code
    codes = ((both >> offset) & (2**bits - 1)).to(torch.uint8)
    return (codes.transpose(0, 1) if dim == 0 else codes).contiguous()
