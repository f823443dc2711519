"""SmoothQuant on tiny Llama/Qwen2: exact smoothing, alpha semantics, modes, KV cache."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qcore.api import ConfigError, adapter_for, build_quantizer
from qcore.engine.pipeline import run_layerwise
from qcore.quant.kvcache import KVCacheQuantizer, fake_quantize_heads
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs, get_scheme
from qcore_backends.cpu.backend import CPUBackend
from qcore_smoothquant.quantizer import smoothing_factors


def _run(model, plugins, calib_ids, scheme="W8A8", **options):
    quantizer = build_quantizer("smoothquant", get_scheme(scheme), options, plugins)
    report = run_layerwise(model, quantizer, adapter_for(model, plugins), CPUBackend(),
                           calib_ids, plugins=plugins, progress=False)
    return quantizer, report


def _test_ids():
    return torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
@pytest.mark.parametrize("smooth_linears", [False, True])
def test_smoothing_only_keeps_logits(tiny_model, plugins, calib_ids, smooth_linears):
    ids = _test_ids()
    ref = tiny_model(ids).logits
    norm_before = tiny_model.model.layers[0].input_layernorm.weight.clone()
    _, report = _run(tiny_model, plugins, calib_ids, quantize=False,
                     smooth_linears=smooth_linears)
    out = tiny_model(ids).logits
    assert not any(isinstance(m, QuantLinear) for m in tiny_model.modules())
    # the factors are far from 1, so the check is not vacuous
    assert not torch.allclose(tiny_model.model.layers[0].input_layernorm.weight, norm_before)
    assert report.layers[0].stats["input_layernorm.scale_max"] > 2
    if smooth_linears:
        assert "mlp.up_proj.scale_max" in report.layers[0].stats
    assert float((out - ref).abs().max() / ref.abs().max()) < 1e-5


@torch.no_grad()
def test_factors_follow_reference_formula_and_clamps():
    a = torch.tensor([4.0, 0.0, 1e-3, 9.0])
    w1 = torch.tensor([[0.5, 0.2, 0.0, -3.0]])
    w2 = torch.tensor([[-1.0, 0.1, 0.0, 1.0]])
    s = smoothing_factors(a, [w1, w2], alpha=0.5)
    w = torch.tensor([1.0, 0.2, 1e-5, 3.0])  # max over both linears, floored at 1e-5
    expected = (a.sqrt() / w.sqrt()).clamp(min=1e-5)
    torch.testing.assert_close(s, expected)
    assert s[1] == 1e-5  # a dead channel: the factor is floored, not zero


@torch.no_grad()
def test_alpha_zero_and_one(tiny_llama, plugins, calib_ids):
    """alpha = 0 does NOT leave activations unchanged: a^0 = 1 (also for a = 0), so
    s = 1 / max|W_j| -- every weight column of the group gets max 1 and the activations
    are multiplied by max|W_j|; the factors do not depend on the calibration data.
    alpha = 1: s = max|X_j| -- every smoothed activation channel has max 1."""
    layer = tiny_llama.model.layers[0]
    names = ("q_proj", "k_proj", "v_proj")
    wmax = torch.stack([getattr(layer.self_attn, n).weight.abs().amax(0) for n in names]
                       ).amax(0)
    norm = layer.input_layernorm.weight.clone()
    other = copy.deepcopy(tiny_llama)
    _run(tiny_llama, plugins, calib_ids, quantize=False, alpha=0.0)
    torch.testing.assert_close(layer.input_layernorm.weight, norm * wmax)
    col = torch.stack([getattr(layer.self_attn, n).weight.abs().amax(0) for n in names]
                      ).amax(0)
    torch.testing.assert_close(col, torch.ones_like(col))
    # other calibration data, same factors
    _run(other, plugins, calib_ids.flip(0)[:, :16], quantize=False, alpha=0.0)
    torch.testing.assert_close(other.model.layers[0].input_layernorm.weight,
                               layer.input_layernorm.weight)

    fresh = make_fresh()
    seen = {}
    _run(fresh, plugins, calib_ids, quantize=False, alpha=1.0)
    hook = fresh.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda m, a, o: seen.__setitem__("x", a[0]))
    captured = []
    # inputs to layer 0 are the embeddings: rerun the calibration windows
    for start in range(0, calib_ids.shape[0], 4):
        fresh(calib_ids[start:start + 4])
        captured.append(seen["x"].abs().reshape(-1, seen["x"].shape[-1]).amax(0))
    hook.remove()
    amax = torch.stack(captured).amax(0)
    torch.testing.assert_close(amax, torch.ones_like(amax), rtol=1e-5, atol=1e-5)


def make_fresh():
    from conftest import make_tiny_model

    return make_tiny_model("llama")


@torch.no_grad()
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_activation_modes_run_and_match_int8_kernel(tiny_model, plugins, calib_ids, mode):
    ids = _test_ids()
    ref = tiny_model(ids).logits
    _, report = _run(tiny_model, plugins, calib_ids, activation_mode=mode)
    qlinears = [m for m in tiny_model.modules() if isinstance(m, QuantLinear)]
    assert len(qlinears) == 14
    act = qlinears[0].spec.activations
    assert act.bits == 8 and act.symmetric
    if mode == "dynamic":
        assert act.granularity == "token" and act.dynamic
    else:
        assert act.granularity == "tensor" and not act.dynamic
        assert all(float(m.input_scale) != 1.0 for m in qlinears)
        assert "self_attn.o_proj.input_scale" in report.layers[0].stats
    out = tiny_model(ids).logits
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.15
    # every layer runs on the real int8 kernel and matches its reference path on the
    # inputs it sees in the model
    counts = CPUBackend().install_kernels(tiny_model)
    assert sum(v for k, v in counts.items() if k.startswith("w8a8_int8")) == 14
    seen = {}
    hooks = [m.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0], o)))
             for i, m in enumerate(qlinears)]
    tiny_model(ids)
    for h in hooks:
        h.remove()
    for i, m in enumerate(qlinears):
        x, y = seen[i]
        yref = m.reference_forward(x)
        assert float((y - yref).abs().max() / yref.abs().max()) < 1e-5


@torch.no_grad()
def test_kv_cache_quantization_is_bounded(tiny_model, plugins, calib_ids):
    ids = _test_ids()
    _run(tiny_model, plugins, calib_ids, scheme="W8A8KV8")
    kvs = [m.qcore_kv for m in tiny_model.modules() if isinstance(getattr(m, "qcore_kv", None),
                                                                   KVCacheQuantizer)]
    assert len(kvs) == 2
    spec = kvs[0].spec
    assert spec.keys.bits == 8 and not spec.keys.symmetric and spec.keys.group_size == 128
    on = tiny_model(ids).logits
    for kv in kvs:
        kv.enabled = False
    off = tiny_model(ids).logits
    diff = float((on - off).abs().max() / off.abs().max())
    assert 0 < diff < 0.05

    # attention with quantized values is a convex combination of quantized rows, so its
    # error is at most half a quantization step of V (per head, group over head_dim)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 32, generator=gen) for _ in range(3))
    v[..., 5] *= 10
    vq = fake_quantize_heads(v, spec.values)
    half_step = ((v.amax(-1) - v.amin(-1)) / 255 / 2).max()
    assert float((vq - v).abs().max()) <= half_step * 1.001
    a_ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    a_q = F.scaled_dot_product_attention(q, k, vq, is_causal=True)
    assert 0 < float((a_q - a_ref).abs().max()) <= half_step * 1.001
    kq = fake_quantize_heads(k, spec.keys)
    a_k = F.scaled_dot_product_attention(q, kq, v, is_causal=True)
    assert float((a_k - a_ref).abs().max() / a_ref.abs().max()) < 0.02


def test_config_options_and_errors(plugins):
    with pytest.raises(ConfigError, match="alpah"):
        build_quantizer("smoothquant", get_scheme("W8A8"), {"alpah": 0.5}, plugins)
    with pytest.raises(ConfigError, match="alpha"):
        build_quantizer("smoothquant", get_scheme("W8A8"), {"alpha": 1.5}, plugins)
    quantizer = build_quantizer("smoothquant", get_scheme("W8A8"),
                                {"alpha": "0.85", "weight_method": "rtn"}, plugins)
    assert quantizer.config.alpha == 0.85


def test_bad_weight_method_fails_up_front(plugins):
    with pytest.raises(ConfigError, match="nosuch"):
        build_quantizer("smoothquant", get_scheme("W8A8"), {"weight_method": "nosuch"},
                        plugins)
    with pytest.raises(ConfigError, match="skp"):
        build_quantizer("smoothquant", get_scheme("W8A8"),
                        {"weight_options": {"skp": []}}, plugins)


@torch.no_grad()
def test_weight_quantizer_composition_passes_options(tiny_llama, plugins, calib_ids):
    _run(tiny_llama, plugins, calib_ids, weight_method="rtn", skip=["self_attn.o_proj"])
    layer = tiny_llama.model.layers[0]
    assert type(layer.self_attn.o_proj) is nn.Linear
    assert isinstance(layer.self_attn.q_proj, QuantLinear)


@torch.no_grad()
def test_smoothing_helps_int8_with_outlier_channels(plugins, calib_ids):
    """The method's point on a model with strong activation outliers: smoothing lowers
    the layer output error of W8A8 with per-tensor static activations."""
    from conftest import make_tiny_model

    errors = {}
    for alpha in (None, 0.5):
        model = make_tiny_model("llama")
        with torch.no_grad():
            for layer in model.model.layers:
                for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                    norm.weight[::16] *= 30  # a few outlier channels
        if alpha is None:
            quantizer = build_quantizer("rtn", QuantArgsScheme(), {}, plugins)
        else:
            quantizer = build_quantizer("smoothquant", QuantArgsScheme(),
                                        {"alpha": alpha, "activation_mode": "static"}, plugins)
        report = run_layerwise(model, quantizer, adapter_for(model, plugins), CPUBackend(),
                               calib_ids, plugins=plugins, progress=False)
        errors[alpha] = report.layers[0].relative_mse
    assert errors[0.5] < errors[None] / 2


def QuantArgsScheme():
    from qcore.schemes import QuantScheme

    return QuantScheme(name="W8A8-static",
                       weights=QuantArgs(bits=8, symmetric=True, granularity="channel"),
                       activations=QuantArgs(bits=8, symmetric=True, granularity="tensor"))


@torch.no_grad()
def test_composition_with_gptq(plugins, calib_ids):
    """SmoothQuant's smoothing, then GPTQ on the smoothed weights (the study's recipe)."""
    if "gptq" not in plugins.registry("quantizer"):
        pytest.skip("gptq plugin not available")
    from conftest import make_tiny_model

    reports, models = {}, {}
    for method in ("rtn", "gptq"):
        model = make_tiny_model("llama")
        _, reports[method] = _run(model, plugins, calib_ids, weight_method=method,
                                  weight_options={"mse_clip": True} if method == "gptq" else {})
        models[method] = model
    for model in models.values():
        q = model.model.layers[1].mlp.down_proj
        assert isinstance(q, QuantLinear) and q.spec.activations.granularity == "token"
    # GPTQ moved the codes away from plain rounding of the same smoothed weights
    a = models["rtn"].model.layers[0].self_attn.q_proj.codes()
    b = models["gptq"].model.layers[0].self_attn.q_proj.codes()
    assert not torch.equal(a, b)
    torch.testing.assert_close(models["rtn"].model.layers[0].input_layernorm.weight,
                               models["gptq"].model.layers[0].input_layernorm.weight)
    assert any(k.startswith("gptq.") for k in reports["gptq"].layers[0].stats)


def test_a_solver_that_cannot_produce_the_scheme_is_refused_up_front(plugins):
    from qcore.schemes import QuantScheme

    scheme = QuantScheme(name="W8A8-tensor",
                         weights=QuantArgs(bits=8, symmetric=True, granularity="tensor"),
                         activations=QuantArgs(bits=8, granularity="token", dynamic=True))
    with pytest.raises(ConfigError, match="gptq solver needs per-channel or per-group weights"):
        build_quantizer("smoothquant", scheme, {"weight_method": "gptq"}, plugins)
    with pytest.raises(ConfigError, match="no solver named 'awq'; available: gptq, rtn"):
        build_quantizer("smoothquant", get_scheme("W8A8"), {"weight_method": "awq"}, plugins)


@pytest.mark.parametrize("smooth_linears", [False, True])
def test_statistics_from_the_pipelines_float_pass(tiny_model, plugins, calib_ids,
                                                  smooth_linears):
    """The activation maxima collected by hooks on the pipeline's float pass give the same
    model as a pass of smoothquant's own, and the layer runs one float pass fewer."""
    from qcore_smoothquant.quantizer import SmoothQuantQuantizer

    class OwnPass(SmoothQuantQuantizer):
        name = "smoothquant-own-pass"

        def float_pass_hooks(self, ctx):
            return {}

    other = copy.deepcopy(tiny_model)
    options = {"smooth_linears": smooth_linears}
    counts = []
    for model, cls in ((tiny_model, None), (other, OwnPass)):
        quantizer = build_quantizer("smoothquant", get_scheme("W8A8"), options, plugins)
        if cls is not None:
            quantizer.__class__ = cls
        calls = [0]
        for layer in model.model.layers:
            layer.register_forward_pre_hook(
                lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        run_layerwise(model, quantizer, adapter_for(model, plugins), CPUBackend(), calib_ids,
                      plugins=plugins, batch_size=2, progress=False)
        counts.append(calls[0])
    # per layer and batch of 2: the float pass (the next layer's inputs: full propagation)
    # and the quantized layer on the error windows (4: 2 batches); with a pass of its own,
    # one float pass more; the first layer's hook also fires once per batch while its
    # inputs are captured
    layers, batches = len(tiny_model.model.layers), -(-calib_ids.shape[0] // 2)
    assert counts == [batches + layers * (batches + 2), batches + layers * (2 * batches + 2)]
    ours = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in other.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name].dequantize(), theirs[name].dequantize()), name


@torch.no_grad()
@pytest.mark.parametrize("scheme", ["W8A8C8", "W8A8C8-TENSOR"])
def test_static_kv_scales_are_the_post_rope_maxima(tiny_model, plugins, calib_ids, scheme):
    """W8A8C8: each layer's static scales are max |k|, max |v| (post-RoPE, of the quantized
    layer over the calibration windows) / 127 per KV channel; -TENSOR: one scale per tensor,
    / 127.5. With the scales the cache is fake-quantized with them, nothing else."""
    from qcore.quant.kvcache import kv_calibration

    _run(tiny_model, plugins, calib_ids, scheme=scheme)
    kvs = [m.qcore_kv for m in tiny_model.model.layers.modules()
           if isinstance(getattr(m, "qcore_kv", None), KVCacheQuantizer)]
    assert len(kvs) == 2
    config = tiny_model.config
    heads = config.num_key_value_heads
    head_dim = config.hidden_size // config.num_attention_heads
    per_channel = scheme == "W8A8C8"
    for kv in kvs:
        assert kv.spec.scale_shape == ([heads, head_dim] if per_channel else [1])
        assert kv.key_scale.shape == tuple(kv.spec.scale_shape)
    # the same maxima, observed by running the finished model's calibration windows again
    # (the first layer's inputs are the embeddings, as in the pipeline; later layers were
    # calibrated on the float model's hidden states: propagation "full")
    kv = kvs[0]
    saved = kv.key_scale.clone(), kv.value_scale.clone()
    seen = []
    original = kv.forward
    kv.forward = lambda q, k, v: (seen.append((k, v)), original(q, k, v))[1]
    with kv_calibration([kv]):
        tiny_model(calib_ids)
    keys, values = torch.cat([k for k, _ in seen]), torch.cat([v for _, v in seen])
    for x, scale in ((keys, kv.key_scale), (values, kv.value_scale)):
        absmax = x.abs().amax(dim=(0, 2)) if per_channel else x.abs().amax().reshape(1)
        expected = absmax.clamp(min=1e-5) / (127 if per_channel else 127.5)
        torch.testing.assert_close(scale, expected.reshape(scale.shape), rtol=1e-6, atol=0)
    # and they are what the pipeline set
    torch.testing.assert_close(kv.key_scale, saved[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(kv.value_scale, saved[1], rtol=1e-5, atol=0)
    kv.forward = original
    # quantized with the fixed scales: codes in [-128, 127] times the scale
    seen.clear()
    ids = _test_ids()
    captured = []
    hook = kv.register_forward_hook(lambda m, a, o: captured.append(o))
    tiny_model(ids)
    hook.remove()
    _, kq, vq = captured[0]
    s = kv.key_scale if not per_channel else kv.key_scale[:, None, :]
    codes = kq.float() / s
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.round().min() >= -128 and codes.round().max() <= 127


def test_static_kv_refused_by_flatquant_and_bad_static_schemes(plugins):
    from qcore.interfaces import UnsupportedScheme
    from qcore.schemes import QuantScheme

    with pytest.raises((ConfigError, UnsupportedScheme), match="static KV"):
        build_quantizer("flatquant", get_scheme("W8A8C8"), {}, plugins)
    base = get_scheme("W8A8").model_dump()
    with pytest.raises(ValueError, match="must be symmetric"):
        QuantScheme.model_validate({**base, "kv_cache": {"bits": 8, "symmetric": False,
                                                         "granularity": "channel"}})
    with pytest.raises(ValueError, match="'tensor' or 'channel'"):
        QuantScheme.model_validate({**base, "kv_cache": {"bits": 8, "granularity": "group",
                                                         "group_size": 64}})


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_activation_quantizer_keeps_the_schemes_conventions(mode):
    """The mode sets granularity and dynamic; the scheme's scale convention, clip and
    symmetry stay (a full-range scheme was once quantized with the signed convention)."""
    from qcore_smoothquant.quantizer import activation_args

    scheme = get_scheme("W8A8")
    act = scheme.activations.model_copy(update={"symmetric_range": "full", "clip_ratio": 0.9})
    args = activation_args(scheme.model_copy(update={"activations": act}), mode)
    assert (args.symmetric_range, args.clip_ratio, args.symmetric) == ("full", 0.9, True)
    assert (args.granularity, args.dynamic) == (("token", True) if mode == "dynamic"
                                                else ("tensor", False))
