"""AWQ's numerical pieces on small tensors: quantizer, scale grid, scorers, clip search."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs
from qcore_awq.search import (
    BlockScorer,
    GramScorer,
    apply_clip,
    candidate_scale,
    fake_quant,
    scaled_quantized,
    search_clip,
    search_scale,
)

pytestmark = pytest.mark.usefixtures("one_thread")


ARGS4 = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=32)
ARGS3 = QuantArgs(bits=3, symmetric=False, granularity="group", group_size=32)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("args", [
    ARGS4, ARGS3,
    QuantArgs(bits=4, symmetric=True, granularity="group", group_size=64),
    QuantArgs(bits=4, symmetric=False, granularity="channel"),
])
def test_fake_quant_matches_quantlinear(args):
    lin = nn.Linear(128, 48, bias=False)
    ref = QuantLinear.from_float(lin, args).dequantize()
    assert torch.equal(fake_quant(lin.weight, args), ref)


def test_candidate_scale_follows_reference_formula():
    s_x = torch.tensor([0.0, 0.5, 2.0, 8.0])
    s = candidate_scale(s_x, 0.5)
    raw = torch.tensor([1e-4, 0.5 ** 0.5, 2 ** 0.5, 8 ** 0.5])
    assert torch.allclose(s, raw / (raw.max() * raw.min()).sqrt())
    assert torch.equal(candidate_scale(s_x, 0.0), torch.ones(4))


def test_gram_scorer_equals_direct_output_mse():
    x = torch.randn(300, 64, generator=_gen(1)) * torch.linspace(0.1, 5, 64)
    w = torch.randn(40, 64, generator=_gen(2))
    cand = scaled_quantized(w, candidate_scale(x.abs().mean(0), 0.3), ARGS4)
    direct = float((x @ cand.T - x @ w.T).double().pow(2).mean())
    gram = GramScorer(w, (x.T @ x).double(), x.shape[0])([cand])
    assert gram == pytest.approx(direct, rel=1e-4)


def test_search_picks_ratio_zero_for_uniform_activations():
    # |x| = 1 on every channel: every candidate scale is all ones, so r = 0 (first) wins
    x = torch.randint(0, 2, (256, 64), generator=_gen(3)).float() * 2 - 1
    w = torch.randn(32, 64, generator=_gen(4))
    mlp = nn.Sequential(nn.Linear(64, 32), nn.SiLU(), nn.Linear(32, 16))
    mlp[0].weight.data = w.clone()
    scorer = BlockScorer(mlp, [mlp[0]], [((x,), {})])
    res = search_scale(x.abs().mean(0), [mlp[0].weight], scorer, ARGS4, n_grid=20)
    assert res.ratio == 0.0
    assert torch.equal(res.scale, torch.ones(64))
    assert res.error_after == res.error_before
    assert len(set(res.history)) == 1
    assert torch.equal(mlp[0].weight, w)  # the scorer restores the weights


def test_search_picks_ratio_zero_when_scaling_only_hurts():
    # symmetric quantization, and in every group the loud channel holds the largest |w|:
    # it is represented exactly at any scale, so scaling it up only coarsens the others
    sym3 = QuantArgs(bits=3, symmetric=True, granularity="group", group_size=32)
    gen = _gen(5)
    x = torch.randn(512, 64, generator=gen)
    loud = [0, 32]
    x[:, loud] *= 20.0
    w = torch.randn(24, 64, generator=gen).clamp(-3, 3)
    w[:, loud] = 4.0 * torch.sign(torch.randn(24, 2, generator=gen))
    scorer = GramScorer(w, (x.T @ x).double(), x.shape[0])
    res = search_scale(x.abs().mean(0), [w], scorer, sym3, n_grid=20)
    assert res.ratio == 0.0
    assert res.error_after == res.history[0] < min(res.history[1:])
    assert torch.equal(res.scale, torch.ones(64))


def test_search_picks_positive_ratio_for_outlier_channels():
    gen = _gen(6)
    x = torch.randn(512, 64, generator=gen)
    x[:, [3, 17, 40]] *= 40.0
    w = torch.randn(24, 64, generator=gen)
    scorer = GramScorer(w, (x.T @ x).double(), x.shape[0])
    res = search_scale(x.abs().mean(0), [w], scorer, ARGS3, n_grid=20)
    assert res.ratio > 0
    assert res.error_after < 0.8 * res.error_before
    assert res.error_after == min(res.history)


@pytest.mark.parametrize("args", [ARGS4, ARGS3])
def test_clip_search_never_raises_the_error_it_measures(args):
    gen = _gen(8)
    x = torch.randn(512, 128, generator=gen) * torch.rand(128, generator=gen) * 3
    w = torch.randn(300, 128, generator=gen)  # 300 rows: two batches, the last partial
    w[5, 7] = 12.0  # an outlier weight makes clipping worthwhile
    res = search_clip(w, x, args, n_grid=20, max_shrink=0.5, batch_rows=256)
    assert res.max_val.shape == (300, 4)
    assert res.error_after <= res.error_before
    assert res.error_after < res.error_before  # something was worth clipping

    def measured(weight: torch.Tensor) -> float:
        # the clip search's own measure, recomputed naively per row and group
        q = fake_quant(weight, args)
        total = 0.0
        for g in range(4):
            cols = slice(32 * g, 32 * (g + 1))
            out = x[:, cols] @ (q[:, cols] - w[:, cols]).T
            total += float(out.double().pow(2).mean(dim=0).sum())
        return total

    lin = nn.Linear(128, 300, bias=False)
    lin.weight.data = w.clone()
    apply_clip(lin, res.max_val, args)
    assert measured(w) == pytest.approx(res.error_before, rel=1e-4)
    assert measured(lin.weight.data) == pytest.approx(res.error_after, rel=1e-4)
    bound = w.abs().reshape(300, 4, 32).amax(-1)
    assert torch.all(res.max_val <= bound) and torch.all(res.max_val >= 0.5 * bound - 1e-6)
