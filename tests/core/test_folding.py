"""Scale folding: the layer computes the same function after a scale is folded in."""

import pytest
import torch
from torch import nn

from qcore.quant.folding import fold_scale


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_fold_scale_is_exact_for_norm_and_linear():
    gen = _gen(7)
    x = torch.randn(10, 32, generator=gen)
    norm = nn.LayerNorm(32)
    norm.weight.data = torch.rand(32, generator=gen) + 0.5
    norm.bias.data = torch.randn(32, generator=gen)
    fc1, fc2 = nn.Linear(32, 48), nn.Linear(48, 16)
    ref = fc2(fc1(norm(x)))
    s1 = torch.rand(32, generator=gen) * 10 + 0.1
    s2 = torch.rand(48, generator=gen) * 10 + 0.1
    with torch.no_grad():
        fold_scale(norm, [fc1], s1, "norm")
        fold_scale(fc1, [fc2], s2, "linear")
    assert torch.allclose(fc2(fc1(norm(x))), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="rows"):
        fold_scale(fc2, [fc1], s1, "linear")
