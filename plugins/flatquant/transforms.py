"""FlatQuant's online transforms: the Kronecker matmul and the modules a quantized model keeps.

Convention: a row vector ``x`` of length ``n1 * n2`` reshaped row-major to ``X`` (n1, n2)
satisfies ``x @ kron(P1, P2) == vec(P1^T X P2)``, so ``x P`` costs two small matmuls
(``n1 * n2 * (n1 + n2)`` multiply-adds per token) and the dense ``n x n`` matrix is never built.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qcore.quant.linear import TransformSpec

KRON_TYPE = "flatquant_kron"
KEY_TYPE = "flatquant_key"


def decompose_dim(n: int) -> tuple[int, int]:
    """Factor sizes ``(a - b, a + b)`` with ``(a - b)(a + b) == n`` and ``a`` the smallest
    integer >= sqrt(n) for which ``a^2 - n`` is a perfect square (FlatQuant's rule):
    1536 -> (32, 48), 576 -> (24, 24), 8960 -> (80, 112)."""
    if n < 1:
        raise ValueError(f"cannot decompose dimension {n}")
    a = math.isqrt(n)
    if a * a < n:
        a += 1
    while True:
        rest = a * a - n
        b = math.isqrt(rest)
        if b * b == rest:
            return a - b, a + b
        a += 1


def kron_matmul(x: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None
                ) -> torch.Tensor:
    """``x @ kron(left, right)`` over the last dimension as ``left^T X right``.

    ``right=None`` means the identity (a transform that only mixes the ``n1`` blocks, e.g.
    FlatQuant's head transform before o_proj)."""
    n1 = left.shape[0]
    shape = x.shape
    n2 = shape[-1] // n1
    if n1 * n2 != shape[-1] or (right is not None and right.shape[0] != n2):
        raise ValueError(f"cannot apply a Kronecker transform of sizes {n1} x "
                         f"{None if right is None else right.shape[0]} to {shape[-1]} features")
    xs = x.reshape(-1, n1, n2)
    xs = torch.matmul(left.t(), xs)
    if right is not None:
        xs = torch.matmul(xs, right)
    return xs.reshape(shape)


def random_orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random orthogonal matrix (QR of a Gaussian with the signs of diag(R) fixed), float64."""
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).unsqueeze(0)


def clip_per_token(x: torch.Tensor, clip_min: torch.Tensor, clip_max: torch.Tensor,
                   symmetric: bool) -> torch.Tensor:
    """Clamp each token to its learned range: ``[clip_min * min(x, 0), clip_max * max(x, 0)]``
    (symmetric: ``[-a, a]`` with ``a`` the larger magnitude of the two).

    Min/max quantization of the clamped tensor uses exactly the range FlatQuant's clipped
    activation quantizer uses, so this plus qcore's per-token fake quantization reproduces
    its learned activation clipping."""
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_max.to(x.dtype)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_min.to(x.dtype)
    if symmetric:
        a = torch.maximum(-xmin, xmax)
        return torch.maximum(torch.minimum(x, a), -a)
    return torch.maximum(torch.minimum(x, xmax), xmin)


class FlatQuantTransform(nn.Module):
    """The online input transform of a FlatQuant linear: ``x -> x kron(P1, P2)`` followed by
    the learned per-token activation clipping.

    Rebuilt from its TransformSpec config ``(n1, n2, has_right, clip)``; the matrices and
    clip ratios are buffers loaded from the saved state."""

    def __init__(self, n1: int, n2: int, has_right: bool = True, clip: str = "none") -> None:
        super().__init__()
        if clip not in ("none", "asym", "sym"):
            raise ValueError(f"FlatQuantTransform clip must be none/asym/sym, got {clip!r}")
        self.n1, self.n2, self.has_right, self.clip = n1, n2, has_right, clip
        self.register_buffer("left", torch.eye(n1))
        if has_right:
            self.register_buffer("right", torch.eye(n2))
        else:
            self.right = None
        if clip != "none":
            self.register_buffer("clip_min", torch.ones(()))
            self.register_buffer("clip_max", torch.ones(()))

    @property
    def features(self) -> int:
        return self.n1 * self.n2

    def spec(self) -> TransformSpec:
        return TransformSpec(type=KRON_TYPE, config={"n1": self.n1, "n2": self.n2,
                                                     "has_right": self.has_right,
                                                     "clip": self.clip})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        right = self.right.to(x.dtype) if self.right is not None else None
        y = kron_matmul(x, self.left.to(x.dtype), right)
        if self.clip != "none":
            y = clip_per_token(y, self.clip_min, self.clip_max, self.clip == "sym")
        return y

    def extra_repr(self) -> str:
        right = self.n2 if self.has_right else "I"
        return f"kron({self.n1} x {right}), clip={self.clip}"


class FlatQuantKeyTransform(nn.Module):
    """The key-cache transform: keys (after RoPE) times ``P_k``, queries times ``P_k^-T``,
    so ``q k^T`` is unchanged in exact arithmetic. Called as ``module(query, key)``."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.register_buffer("matrix", torch.eye(head_dim))
        self.register_buffer("matrix_inv_t", torch.eye(head_dim))

    def spec(self) -> TransformSpec:
        return TransformSpec(type=KEY_TYPE, config={"head_dim": self.head_dim})

    def forward(self, query: torch.Tensor, key: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.matmul(query, self.matrix_inv_t.to(query.dtype)),
                torch.matmul(key, self.matrix.to(key.dtype)))

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}"
