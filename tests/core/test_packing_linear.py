import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcore.quant.linear import QuantLinear
from qcore.quant.packing import pack_codes, packed_width, unpack_codes
from qcore.quant.qparams import fake_quantize_weight, qparams_from_range
from qcore.schemes import QuantArgs


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [7, 16])
def test_pack_round_trip(bits, cols):
    codes = torch.randint(0, 2**bits, (5, cols), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (5, packed_width(cols, bits))
    assert torch.equal(unpack_codes(packed, bits, cols), codes)


def test_pack_layout_low_nibble_first():
    packed = pack_codes(torch.tensor([[1, 2, 15, 0]]), 4)
    assert packed.tolist() == [[0x21, 0x0F]]


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="0, 15"):
        pack_codes(torch.tensor([[16]]), 4)


@pytest.mark.parametrize("args", [
    QuantArgs(bits=4, symmetric=False, granularity="group", group_size=8),
    QuantArgs(bits=8, symmetric=True, granularity="channel"),
    QuantArgs(bits=3, symmetric=True, granularity="tensor"),
])
def test_quant_linear_dequantizes_to_rtn_and_runs_reference_path(args):
    torch.manual_seed(0)
    linear = nn.Linear(32, 12, bias=True)
    q = QuantLinear.from_float(linear, args)
    expected = fake_quantize_weight(linear.weight.detach(), args)
    torch.testing.assert_close(q.dequantize(), expected, rtol=0, atol=1e-6)
    x = torch.randn(3, 5, 32)
    torch.testing.assert_close(q(x), F.linear(x, expected, linear.bias), rtol=1e-5, atol=1e-5)
    if args.bits <= 4:
        assert q.qweight.numel() == 12 * 16  # two codes per byte


def test_quant_linear_honours_a_permuted_group_index():
    torch.manual_seed(0)
    linear = nn.Linear(8, 2, bias=False)
    args = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=4)
    perm = torch.tensor([3, 0, 7, 1, 5, 2, 6, 4])
    g_idx = torch.empty(8, dtype=torch.int32)
    g_idx[perm] = torch.arange(8, dtype=torch.int32) // 4  # groups follow the permuted order
    w = linear.weight.detach()
    groups = [w[:, perm[:4]], w[:, perm[4:]]]
    params = [qparams_from_range(g.amin(1), g.amax(1), 4, False) for g in groups]
    scale = torch.stack([p[0] for p in params], 1)
    zero = torch.stack([p[1] for p in params], 1)
    q = QuantLinear.from_float(linear, args, scale=scale, zero=zero, g_idx=g_idx)
    deq = q.dequantize()
    for col in range(8):
        s = scale[:, g_idx[col]]
        assert torch.all((deq[:, col] - w[:, col]).abs() <= s / 2 + 1e-6)


def test_quant_linear_static_activation_buffers():
    linear = nn.Linear(8, 4)
    act = QuantArgs(bits=8, granularity="tensor", dynamic=False)
    q = QuantLinear.from_float(linear, QuantArgs(bits=8), activations=act)
    assert "input_scale" in dict(q.named_buffers())
    assert "in=8" in repr(q) and "int8 sym tensor" in repr(q)


def test_build_transform_names_the_layer_and_the_missing_type():
    from qcore.quant.linear import TransformSpec, build_transform

    assert build_transform(None, {}, "x") is None
    module = build_transform(TransformSpec(type="id", config={}), {"id": nn.Identity}, "x")
    assert isinstance(module, nn.Identity)
    with pytest.raises(ValueError, match="model.layers.0.q_proj needs module type 'kron'"):
        build_transform(TransformSpec(type="kron"), {"id": nn.Identity}, "model.layers.0.q_proj")


@pytest.mark.parametrize("order", ["natural", "permuted"])
def test_dequantize_matches_the_per_column_formula(order):
    """The contiguous-groups fast path and the gather path give (codes - z[g]) * s[g]
    exactly, and leave float codes passed in untouched."""
    from qcore.quant.qparams import dequantize_weight

    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (6, 32), generator=gen).float()
    scale = torch.rand(6, 4, generator=gen) + 0.1
    zero = torch.randint(0, 16, (6, 4), generator=gen).float()
    g_idx = torch.arange(32) // 8
    if order == "permuted":
        g_idx = g_idx[torch.randperm(32, generator=gen)]
    before = codes.clone()
    got = dequantize_weight(codes, scale, zero, g_idx.int())
    expected = torch.stack([(codes[:, j] - zero[:, g]) * scale[:, g]
                            for j, g in enumerate(g_idx.tolist())], dim=1)
    assert torch.equal(got, expected)
    assert torch.equal(codes, before)


def test_dequantized_weight_is_cached_only_inside_the_context():
    from qcore.quant.linear import cached_dequantization

    linear = nn.Linear(32, 8)
    q = QuantLinear.from_float(linear, QuantArgs(bits=4, granularity="group", group_size=16))
    x = torch.randn(3, 32)
    plain = q(x)
    assert q._dequant_cache is None  # a 4-bit layer stays 4-bit in memory
    with cached_dequantization():
        first = q(x)
        cache = q._dequant_cache
        assert cache is not None
        q(x)
        assert q._dequant_cache is cache  # dequantized once
    assert q._dequant_cache is None
    assert torch.equal(first, plain)
