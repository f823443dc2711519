import torch

from qcore.quant.kvcache import KVCacheSpec, enable_kv_quantization, fake_quantize_heads
from qcore.schemes import QuantArgs, get_scheme


def test_head_quantization_groups_over_head_dim():
    x = torch.randn(2, 3, 5, 16)
    args = QuantArgs(bits=8, symmetric=False, granularity="group", group_size=128, dynamic=True)
    y = fake_quantize_heads(x, args)  # group capped at head_dim=16
    step = (x.amax(-1) - x.amin(-1)) / 255
    assert torch.all((y - x).abs() <= step.unsqueeze(-1) / 2 + 1e-6)


def test_kv_quantization_changes_attention_by_a_bounded_amount(tiny_model):
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = tiny_model(ids).logits
    errors = {}
    for bits in (8, 4):
        kv = get_scheme(f"W{bits}A{bits}KV{bits}").kv_cache
        enable_kv_quantization(tiny_model, KVCacheSpec(keys=kv, values=kv))
        out = tiny_model(ids).logits
        errors[bits] = float((out - ref).norm() / ref.norm())
        for m in tiny_model.modules():
            if hasattr(m, "qcore_kv"):
                m.qcore_kv.enabled = False
        # disabled quantizer = plain attention again
        torch.testing.assert_close(tiny_model(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert 0 < errors[8] < 0.02 and errors[8] < errors[4] < 0.3


def test_static_kv_scales_from_calibration_and_refused_before():
    import pytest

    from qcore.quant.kvcache import KVCacheQuantizer, kv_calibration, spec_for

    args = get_scheme("W8A8C8").kv_cache
    quantizer = KVCacheQuantizer(spec_for(args, args, num_kv_heads=2, head_dim=4))
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 2, 5, 4, generator=gen) for _ in range(3))
    with pytest.raises(RuntimeError, match="never calibrated"):
        quantizer(q, k, v)
    with kv_calibration([quantizer]):
        out = quantizer(q, k, v)
        assert all(a is b for a, b in zip(out, (q, k, v), strict=True))  # observed only
        quantizer(q, k * 0.5, v * 0.5)  # a smaller batch leaves the maxima as they were
    torch.testing.assert_close(quantizer.key_scale, k.abs().amax(dim=(0, 2)) / 127)
    torch.testing.assert_close(quantizer.value_scale, v.abs().amax(dim=(0, 2)) / 127)
    _, kq, vq = quantizer(q, k, v)
    s = quantizer.key_scale[:, None, :]
    torch.testing.assert_close(kq, torch.clamp(torch.round(k / s), -128, 127) * s)
    # the channel holding the maximum is reproduced within half a step
    assert float((kq - k).abs().max()) <= float(s.max()) / 2 + 1e-7
