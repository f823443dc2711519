"""FlatQuant's online transforms: factor sizes, Kronecker matmul, learned activation clipping."""

import pytest
import torch

from qcore.quant.qparams import fake_quantize_activation
from qcore.schemes import QuantArgs
from qcore_flatquant.learnables import fake_quant_tokens_ste
from qcore_flatquant.transforms import (
    FlatQuantKeyTransform,
    FlatQuantTransform,
    clip_per_token,
    decompose_dim,
    kron_matmul,
    random_orthogonal,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n, sizes", [(1536, (32, 48)), (576, (24, 24)), (3584, (56, 64)),
                                      (5120, (64, 80)), (8960, (80, 112)),
                                      (18944, (128, 148)), (13824, (108, 128)),
                                      (27648, (144, 192)), (64, (8, 8)), (128, (8, 16))])
def test_decompose_dim_matches_reference_rule(n, sizes):
    assert decompose_dim(n) == sizes


def test_kron_matmul_equals_dense_kron():
    gen = torch.Generator().manual_seed(0)
    left = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    right = torch.randn(10, 10, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 7, 60, generator=gen, dtype=torch.float64)
    dense = x @ torch.kron(left, right)
    torch.testing.assert_close(kron_matmul(x, left, right), dense, rtol=1e-12, atol=1e-12)
    # right=None is kron(left, I): the head transform before o_proj
    torch.testing.assert_close(kron_matmul(x, left, None), x @ torch.kron(left, torch.eye(
        10, dtype=torch.float64)), rtol=1e-12, atol=1e-12)


def test_transform_module_applies_kron_and_rejects_wrong_width():
    gen = torch.Generator().manual_seed(1)
    t = FlatQuantTransform(4, 8)
    t.left.copy_(random_orthogonal(4, gen))
    t.right.copy_(torch.randn(8, 8, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 32)
    torch.testing.assert_close(t(x), x @ torch.kron(t.left, t.right), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Kronecker transform of sizes 4 x 8"):
        t(torch.randn(2, 30))
    rebuilt = FlatQuantTransform(**t.spec().config)
    assert set(rebuilt.state_dict()) == set(t.state_dict())


def test_random_orthogonal_is_orthogonal():
    q = random_orthogonal(24, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q @ q.T, torch.eye(24, dtype=torch.float64))


def test_key_transform_keeps_scores():
    gen = torch.Generator().manual_seed(2)
    kt = FlatQuantKeyTransform(16)
    m = torch.randn(16, 16, generator=gen, dtype=torch.float64) + 4 * torch.eye(16)
    kt.matrix.copy_(m)
    kt.matrix_inv_t.copy_(torch.linalg.inv(m).T)
    q, k = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    q2, k2 = kt(q, k)
    torch.testing.assert_close(q2 @ k2.transpose(-1, -2), q @ k.transpose(-1, -2),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric, bits", [(False, 4), (True, 8), (True, 4)])
def test_clamp_then_quantize_equals_clipped_quantizer(symmetric, bits):
    """The deployed path (online clamp, qcore per-token fake quant) equals the training-time
    quantizer with learned clip factors."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, 48, generator=gen) * 3 + torch.randn(64, 1, generator=gen)
    cmin, cmax = torch.tensor(0.7), torch.tensor(0.85)
    args = QuantArgs(bits=bits, symmetric=symmetric, granularity="token", dynamic=True)
    deployed = fake_quantize_activation(clip_per_token(x, cmin, cmax, symmetric), args)
    trained = fake_quant_tokens_ste(x, args, cmin, cmax)
    step = (x.amax(-1) - x.amin(-1)).max() / (2**bits - 1)
    # identical up to float ties: compare element-wise with a tolerance far below one step
    close = (deployed - trained).abs() <= 1e-4 * step
    assert close.float().mean() > 0.999
    assert (deployed - trained).abs().max() <= step * 1.01
