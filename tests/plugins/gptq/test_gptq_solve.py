"""GPTQ's solve (qcore_gptq.solve) on single matrices: blocked == unblocked, objective
below RTN, exact dequantization of the chosen weights, singular Hessians, the MSE clip
search, the options' validation; and the Hessian it reads (qcore.quant.hessian)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from qcore.quant.hessian import HessianAccumulator
from qcore.quant.linear import QuantLinear
from qcore.quant.observers import MSEClip, find_params
from qcore.quant.qparams import fake_quantize, fake_quantize_weight, qparams_from_range
from qcore.schemes import QuantArgs
from qcore_gptq.solve import (
    CholeskyFailed,
    GPTQOptions,
    factor_hessian,
    gptq_quantize,
    objective,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(bits=4, symmetric=False, group=32):
    if group is None:
        return QuantArgs(bits=bits, symmetric=symmetric, granularity="channel")
    return QuantArgs(bits=bits, symmetric=symmetric, granularity="group", group_size=group)


def _problem(rows=24, cols=128, tokens=512, seed=0, dtype=torch.float64):
    """Weights and a Hessian from correlated inputs with uneven channel scales."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=gen, dtype=dtype) / cols**0.5
    mix += torch.eye(cols, dtype=dtype) * 0.3
    latent = torch.randn(tokens, cols, generator=gen, dtype=dtype)
    x = latent @ mix * (1 + 4 * torch.rand(cols, generator=gen, dtype=dtype))
    W = torch.randn(rows, cols, generator=gen, dtype=dtype)
    H = 2 * x.T @ x / tokens
    return W, H, x


def unblocked_gptq(W, H, args, act_order=False, static_groups=False, damp=0.01):
    """The algorithm one column at a time, every later column updated right away."""
    W = W.clone()
    H = H.clone()
    rows, cols = W.shape
    G = args.group_size if args.granularity == "group" else cols
    scale, zero = find_params(W, args)
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    static = {}
    if static_groups:
        for g in range(cols // G):
            static[g] = find_params(W[:, g * G:(g + 1) * G], args)
    perm = torch.arange(cols)
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H = H + damp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for j in range(cols):
        if args.granularity == "group":
            if static_groups:
                scale, zero = static[int(perm[j]) // G]
            elif j % G == 0:
                scale, zero = find_params(W[:, j:j + G], args)
        q = fake_quantize(W[:, j:j + 1], scale, zero, args.bits)[:, 0]
        Q[:, j] = q
        err = (W[:, j] - q) / U[j, j]
        W[:, j:] -= err[:, None] * U[j, j:][None, :]
    return Q[:, torch.argsort(perm)]


@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("group", [32, None])
def test_blocked_equals_unblocked(act_order, static_groups, group):
    W, H, _ = _problem()
    args = _args(group=group)
    expected = unblocked_gptq(W, H, args, act_order, static_groups)
    for block in (1, 5, 16, 32, 48, 128, 1000):
        result = gptq_quantize(W, H, args, GPTQOptions(block_size=block, act_order=act_order,
                                                       static_groups=static_groups))
        assert torch.allclose(result.Q, expected, rtol=0, atol=1e-10), block


def test_blocked_equals_unblocked_float32_codes():
    """In float32 the blocked solver picks the same codes as the unblocked one (up to rare
    rounding ties) for the default block size."""
    W, H, _ = _problem(dtype=torch.float32)
    args = _args(group=32)
    expected = unblocked_gptq(W, H, args)
    got = gptq_quantize(W, H, args, GPTQOptions(block_size=128)).Q
    mismatch = (got - expected).abs() > 1e-4
    assert mismatch.float().mean() < 1e-3


def test_hessian_running_mean_is_batch_independent():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, 16, generator=gen)
    flat = x.reshape(-1, 16).double()
    expected = 2 * flat.T @ flat / flat.shape[0]
    for chunks in ([120], [1, 119], [40, 40, 40], [7, 33, 80]):
        acc = HessianAccumulator(16)
        start = 0
        for n in chunks:
            acc.add(x.reshape(-1, 16)[start:start + n])
            start += n
        assert acc.tokens == 120
        assert acc.H.dtype == torch.float32
        assert torch.allclose(acc.H.double(), expected, rtol=1e-5, atol=1e-5)
    batched = HessianAccumulator(16)
    batched.add(x)  # (batch, seq, features) flattens over every token
    assert torch.allclose(batched.H.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group", [32, 64, None])
@pytest.mark.parametrize("bits", [3, 4])
def test_objective_clearly_below_rtn(bits, group):
    W, H, _ = _problem(rows=32, cols=128, dtype=torch.float32)
    args = _args(bits=bits, group=group)
    result = gptq_quantize(W, H, args)
    rtn = objective(W, fake_quantize_weight(W, args), H)
    assert result.loss == pytest.approx(objective(W, result.Q, H))
    assert result.loss < 0.75 * rtn, (result.loss, rtn)
    # act-order does at least about as well on these uneven channels
    ordered = gptq_quantize(W, H, args, GPTQOptions(act_order=True, static_groups=True))
    assert ordered.loss < 0.8 * rtn


def _as_quant_linear(W, result, args):
    shell = nn.Linear(W.shape[1], W.shape[0], bias=False)
    shell.weight.data = result.Q.float()
    return QuantLinear.from_float(shell, args, scale=result.scale.float(),
                                  zero=result.zero.float(), g_idx=result.g_idx)


@pytest.mark.parametrize("bits,symmetric", [(2, False), (3, True), (4, False), (4, True),
                                             (8, True), (8, False)])
@pytest.mark.parametrize("group,act_order,static_groups", [
    (32, False, False), (64, True, True), (128, True, False), (None, False, False),
    (None, True, False)])
def test_quant_linear_dequantizes_to_gptq_choice(bits, symmetric, group, act_order,
                                                  static_groups):
    W, H, _ = _problem(rows=8, cols=256, tokens=300, dtype=torch.float32)
    args = _args(bits=bits, symmetric=symmetric, group=group)
    result = gptq_quantize(W, H, args, GPTQOptions(act_order=act_order,
                                                   static_groups=static_groups, block_size=64))
    q = _as_quant_linear(W, result, args)
    assert torch.equal(q.dequantize(), result.Q)
    codes = q.codes().float()
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    if group is not None and act_order and static_groups:
        # static groups keep the natural group of every column
        assert torch.equal(result.g_idx, torch.arange(256, dtype=torch.int32) // group)
    if group is not None and act_order and not static_groups:
        # groups follow the permuted order: group k holds perm[k*G:(k+1)*G]
        perm = result.perm
        for k in range(256 // group):
            assert (result.g_idx[perm[k * group:(k + 1) * group]] == k).all()


def test_dead_inputs():
    W, H, _ = _problem(rows=8, cols=64)
    H[5, :] = 0
    H[:, 5] = 0
    H[40, :] = 0
    H[:, 40] = 0
    result = gptq_quantize(W, H, _args(group=32))
    assert result.dead == 2
    assert torch.isfinite(result.Q).all()
    # a dead column quantizes its zeroed weights: dequantizes to exactly 0
    assert (result.Q[:, [5, 40]] == 0).all()
    expected = unblocked_gptq(W, H, _args(group=32))
    assert torch.allclose(result.Q, expected, atol=1e-10)


def test_singular_hessian_raises_dampening(caplog):
    """A rank-deficient Hessian with damp=0: Cholesky fails, dampening is raised and logged."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 32, generator=gen)  # 8 tokens, 32 features: rank 8
    H = 2 * x.T @ x / 8
    W = torch.randn(4, 32, generator=gen)
    with caplog.at_level(logging.WARNING, logger="qcore_gptq.solve"):
        result = gptq_quantize(W, H, _args(group=None), GPTQOptions(damp=0.0, damp_step=0.01),
                               name="toy")
    assert result.damp_raises >= 1
    assert result.damp == pytest.approx(0.01 * result.damp_raises)
    assert torch.isfinite(result.Q).all()
    assert any("toy: Cholesky failed" in r.message for r in caplog.records)


def test_cholesky_failure_is_bounded():
    H = -torch.eye(16)
    W = torch.randn(4, 16)
    with pytest.raises(CholeskyFailed, match=r"mylayer.*damp_max_steps"):
        gptq_quantize(W, H, _args(group=None), GPTQOptions(damp_max_steps=3), name="mylayer")


def test_linear_algebra_goes_through_given_functions():
    calls = []

    def chol(a, upper=False):
        calls.append(("cholesky", upper))
        return torch.linalg.cholesky(a, upper=upper)

    def chol_inv(f, upper=False):
        calls.append(("cholesky_inverse", upper))
        return torch.cholesky_inverse(f, upper=upper)

    W, H, _ = _problem(rows=4, cols=32)
    gptq_quantize(W, H, _args(group=None),
                  linalg=SimpleNamespace(cholesky=chol, cholesky_inverse=chol_inv))
    assert calls == [("cholesky", False), ("cholesky_inverse", False), ("cholesky", True)]


def reference_mse_params(x, args, grid=100, maxshrink=0.8, norm=2.4):
    """The reference quantizer's loop over shrink factors, row-wise strict improvement."""
    xmin, xmax = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
    scale, zero = qparams_from_range(xmin, xmax, args.bits, args.symmetric)
    best = torch.full((x.shape[0], 1), float("inf"), dtype=x.dtype)
    for i in range(int(maxshrink * grid)):
        p = 1 - i / grid
        s, z = qparams_from_range(p * xmin, p * xmax, args.bits, args.symmetric)
        err = (fake_quantize(x, s, z, args.bits) - x).abs().pow(norm).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        zero = torch.where(better, z, zero)
    return scale, zero


@pytest.mark.parametrize("symmetric", [False, True])
def test_mse_clip_matches_reference_grid(symmetric):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 64, generator=gen, dtype=torch.float64)
    x[:, 0] *= 6  # outliers make clipping worthwhile
    args = _args(bits=3, symmetric=symmetric, group=64)
    s, z = find_params(x, args, MSEClip())
    rs, rz = reference_mse_params(x, args)
    assert torch.equal(s, rs) and torch.equal(z, rz)
    plain_s, plain_z = find_params(x, args)
    err = (fake_quantize(x, s, z, 3) - x).abs().pow(2.4).sum()
    plain = (fake_quantize(x, plain_s, plain_z, 3) - x).abs().pow(2.4).sum()
    assert err < plain
    assert (s <= plain_s + 1e-12).all()


def test_mse_clip_in_gptq_lowers_weight_error():
    W, H, _ = _problem(rows=32, cols=128, dtype=torch.float32)
    W[:, ::17] *= 5
    args = _args(bits=3, group=None)
    plain = gptq_quantize(W, H, args)
    clipped = gptq_quantize(W, H, args, GPTQOptions(mse=MSEClip()))
    assert clipped.loss < plain.loss


@pytest.mark.parametrize("blocks", [1, 3, 4, 40])
def test_hessian_upper_blocks_mirror_to_the_full_product(blocks):
    """Only upper block rows are accumulated; H must still be the full symmetric product,
    also when H is read between updates (the lower half is rebuilt on every read)."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(90, 37, generator=gen)
    acc = HessianAccumulator(37, blocks=blocks)
    acc.add(x[:50])
    first = x[:50].double()
    assert torch.allclose(acc.H.double(), 2 * first.T @ first / 50, rtol=1e-5, atol=1e-5)
    acc.add(x[50:])
    full = x.double()
    H = acc.H
    assert torch.equal(H, H.T)
    assert torch.allclose(H.double(), 2 * full.T @ full / 90, rtol=1e-5, atol=1e-5)


def test_shared_hessian_factor_gives_the_same_result():
    W, H, _ = _problem(rows=24, cols=64, seed=4)
    args = _args(group=16)
    ordered = GPTQOptions(act_order=True, static_groups=True)
    factor = factor_hessian(H, ordered)
    for seed in (4, 5):  # two weights sharing one input, as q/k/v do
        W = _problem(rows=24, cols=64, seed=seed)[0]
        shared = gptq_quantize(W, H, args, ordered, factor=factor)
        own = gptq_quantize(W, H, args, ordered)
        assert torch.equal(shared.Q, own.Q) and torch.equal(shared.g_idx, own.g_idx)
    with pytest.raises(ValueError, match="layer7: the given Hessian factor"):
        gptq_quantize(W, H, args, GPTQOptions(act_order=False), factor=factor, name="layer7")


@pytest.mark.parametrize("field,value", [
    ("block_size", 0), ("block_size", 1.5), ("block_size", True), ("damp", -0.1),
    ("damp", float("nan")), ("damp_step", 0.0), ("damp_max_steps", -1),
    ("act_order", 1), ("static_groups", "yes"), ("mse", 0.8)])
def test_options_are_validated(field, value):
    with pytest.raises(ValueError, match=f"GPTQOptions.{field} must be"):
        GPTQOptions(**{field: value})


def test_options_are_frozen_and_the_solver_config_builds_them():
    from dataclasses import FrozenInstanceError

    from qcore_gptq.solver import GPTQSolverConfig

    with pytest.raises(FrozenInstanceError):
        GPTQOptions().block_size = 64  # type: ignore[misc]
    cfg = GPTQSolverConfig(block_size=32, damp=0.02, damp_step=0.5, damp_max_steps=2,
                           act_order=False, static_groups=False, mse_clip=True, mse_grid=10)
    assert cfg.options() == GPTQOptions(block_size=32, damp=0.02, damp_step=0.5,
                                        damp_max_steps=2, mse=MSEClip(grid=10))
    assert GPTQSolverConfig().options() == GPTQOptions(act_order=True, static_groups=True)
