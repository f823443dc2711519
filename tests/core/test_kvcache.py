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
