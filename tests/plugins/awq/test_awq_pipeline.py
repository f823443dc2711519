"""AWQ through the layer-wise pipeline on tiny random Llama / Qwen2 models."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import CollectLayerReports, make_tiny_model

from qcore import api
from qcore.config import parse_assignments
from qcore.engine.pipeline import run_layerwise
from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import get_scheme
from qcore_awq.search import candidate_scale

pytestmark = pytest.mark.usefixtures("one_thread")


SCHEME = get_scheme("W4A16", 32)
MLP_GROUP = "post_attention_layernorm->gate_proj,up_proj"
DOWN_GROUP = "up_proj->down_proj"
QKV_GROUP = "input_layernorm->q_proj,k_proj,v_proj"
VO_GROUP = "v_proj->o_proj"


def _run(model, calib_ids, plugins, options=None, scheme=SCHEME, listeners=()):
    quantizer = api.build_quantizer("awq", scheme, options or {}, plugins)
    backend = api.build_backend("cpu", plugins)
    for i, obj in enumerate(listeners):
        plugins.add_plugin(obj, name=f"awq-test-listener-{i}")
    return run_layerwise(model, quantizer, api.adapter_for(model, plugins), backend, calib_ids,
                         plugins=plugins, progress=False)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("kv_heads", [2, 4])
def test_folding_scales_leaves_logits_unchanged(kind, kv_heads, calib_ids, plugins):
    model = make_tiny_model(kind, num_key_value_heads=kv_heads)
    norm_before = model.model.layers[0].input_layernorm.weight.detach().clone()
    with torch.no_grad():
        ref = model(calib_ids).logits
    report = _run(model, calib_ids, plugins, {"quantize": False, "clip": False})
    with torch.no_grad():
        out = model(calib_ids).logits
    rel = float((out - ref).norm() / ref.norm())
    assert rel < 1e-5
    # the search did move weights: at least one group picked r > 0 and was folded
    ratios = [v for layer in report.layers for k, v in layer.stats.items()
              if k.endswith(".ratio")]
    assert any(r > 0 for r in ratios)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norm_before)


def test_gqa_skips_v_to_o_and_says_so(tiny_qwen2, calib_ids, plugins, caplog):
    with caplog.at_level(logging.INFO, logger="qcore_awq"):
        report = _run(tiny_qwen2, calib_ids, plugins, {"clip": False})
    for layer in report.layers:
        assert layer.stats["skipped_groups"] == ["self_attn.v_proj->self_attn.o_proj"]
        assert f"{VO_GROUP}.ratio" not in layer.stats
        assert {f"{QKV_GROUP}.ratio", f"{MLP_GROUP}.ratio", f"{DOWN_GROUP}.ratio"} <= set(
            layer.stats)
    assert "grouped-query attention, 4 query / 2 KV heads" in caplog.text
    assert "(32, 64) and (64, 64) differ" in caplog.text


def test_mha_scales_v_to_o(calib_ids, plugins):
    model = make_tiny_model("llama", num_key_value_heads=4)
    report = _run(model, calib_ids, plugins, {"clip": False})
    for layer in report.layers:
        assert "skipped_groups" not in layer.stats
        assert layer.stats[f"{VO_GROUP}.error_after"] <= layer.stats[f"{VO_GROUP}.error_before"]


def test_quantizes_every_linear_and_reports_each_layer(tiny_model, calib_ids, plugins):
    watch = CollectLayerReports()
    report = _run(tiny_model, calib_ids, plugins, listeners=[watch])
    assert [r.index for r in watch.reports] == [0, 1]
    for layer in tiny_model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert isinstance(getattr(layer.self_attn, name), QuantLinear)
        for name in ("gate_proj", "up_proj", "down_proj"):
            assert isinstance(getattr(layer.mlp, name), QuantLinear)
    for layer in report.layers:
        stats = layer.stats
        for group in (QKV_GROUP, MLP_GROUP, DOWN_GROUP):
            assert 0 <= stats[f"{group}.ratio"] < 1
            assert stats[f"{group}.error_after"] <= stats[f"{group}.error_before"]
        for name in ("v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
            assert stats[f"{name}.clip_error_after"] <= stats[f"{name}.clip_error_before"]
        assert "q_proj.clip_error_after" not in stats  # q and k are not clipped
        assert "k_proj.clip_error_after" not in stats
        assert layer.relative_mse < 0.05


def test_awq_beats_rtn_on_layer_error(calib_ids, plugins):
    rtn_model, awq_model = make_tiny_model("llama", seed=1), make_tiny_model("llama", seed=1)
    rtn = run_layerwise(rtn_model, api.build_quantizer("rtn", SCHEME, {}, plugins),
                        api.adapter_for(rtn_model, plugins), api.build_backend("cpu", plugins),
                        calib_ids, plugins=plugins, progress=False, propagation="full")
    awq = _run(awq_model, calib_ids, plugins)
    for r, a in zip(rtn.layers, awq.layers, strict=True):
        assert a.relative_mse < r.relative_mse


def test_search_matches_a_naive_reference_loop(tiny_llama, calib_ids, plugins):
    """Layer 0's MLP and up -> down groups against a direct transcription of the
    reference loop (quantize, run the block on every token, keep the first best)."""
    layer = tiny_llama.model.layers[0]
    feats = {}

    def keep(name):
        def hook(_m, args, _out):
            feats.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))
        return hook

    handles = [layer.mlp.register_forward_hook(keep("mlp")),
               layer.mlp.down_proj.register_forward_hook(keep("down"))]
    with torch.no_grad():
        tiny_llama(calib_ids)
    for h in handles:
        h.remove()
    x_mlp, x_down = torch.cat(feats["mlp"]), torch.cat(feats["down"])
    w = {n: getattr(layer.mlp, n).weight.detach().clone()
         for n in ("gate_proj", "up_proj", "down_proj")}

    def mlp(x, gate, up, down):
        return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T

    def naive(x, fn, names):
        ref = fn({})
        errs = []
        for i in range(20):
            s = candidate_scale(x.abs().mean(0), i / 20)
            cand = {n: fake_quantize_weight(w[n] * s, SCHEME.weights) / s for n in names}
            errs.append(float((fn(cand) - ref).pow(2).mean()))
        best = min(range(20), key=lambda i: (errs[i], i))
        return best / 20, errs[0], errs[best]

    def mlp_fn(c):
        return mlp(x_mlp, c.get("gate_proj", w["gate_proj"]), c.get("up_proj", w["up_proj"]),
                   w["down_proj"])

    def down_fn(c):
        return x_down @ c.get("down_proj", w["down_proj"]).T

    expect_mlp = naive(x_mlp, mlp_fn, ["gate_proj", "up_proj"])
    expect_down = naive(x_down, down_fn, ["down_proj"])
    stats = _run(tiny_llama, calib_ids, plugins, {"clip": False}).layers[0].stats
    for group, (ratio, before, after) in ((MLP_GROUP, expect_mlp), (DOWN_GROUP, expect_down)):
        assert stats[f"{group}.ratio"] == ratio
        assert stats[f"{group}.error_before"] == pytest.approx(before, rel=1e-3)
        assert stats[f"{group}.error_after"] == pytest.approx(after, rel=1e-3)


def test_search_samples_subset_runs(tiny_qwen2, calib_ids, plugins):
    report = _run(tiny_qwen2, calib_ids, plugins, {"search_samples": 2, "n_grid": 5})
    assert all(layer.stats[f"{MLP_GROUP}.ratio"] in (0, 0.2, 0.4, 0.6, 0.8)
               for layer in report.layers)


def test_options_and_schemes_are_validated(plugins):
    q = api.build_quantizer("awq", get_scheme("W3A16", 64),
                            parse_assignments(["n_grid=10", "clip=false", "max_shrink=0.3"]),
                            plugins)
    assert (q.config.n_grid, q.config.clip, q.config.max_shrink) == (10, False, 0.3)
    assert q.propagation == "full"
    with pytest.raises(api.ConfigError, match="n_gird"):
        api.build_quantizer("awq", SCHEME, {"n_gird": 10}, plugins)
    with pytest.raises(api.ConfigError, match="max_shrink"):
        api.build_quantizer("awq", SCHEME, {"max_shrink": 1.5}, plugins)
    with pytest.raises(api.ConfigError, match="weights only"):
        api.build_quantizer("awq", get_scheme("W8A8"), {}, plugins)


def test_statistics_from_the_pipelines_float_pass(tiny_qwen2, calib_ids, plugins):
    """The mean |x|, block calls, Gram matrices and clip samples gathered by hooks on the
    pipeline's float pass give the same model as a pass of AWQ's own, one layer forward
    fewer per layer."""
    import copy

    from qcore_awq.quantizer import AWQQuantizer

    class OwnPass(AWQQuantizer):
        name = "awq-own-pass"

        def float_pass_hooks(self, ctx):
            return {}

    other = copy.deepcopy(tiny_qwen2)
    counts = []
    for model, cls in ((tiny_qwen2, AWQQuantizer), (other, OwnPass)):
        quantizer = cls(api.build_quantizer("awq", SCHEME, {}, plugins).config, SCHEME)
        calls = [0]
        for layer in model.model.layers:
            layer.register_forward_pre_hook(
                lambda *_, calls=calls: calls.__setitem__(0, calls[0] + 1))
        run_layerwise(model, quantizer, api.adapter_for(model, plugins),
                      api.build_backend("cpu", plugins), calib_ids, plugins=plugins,
                      batch_size=2, progress=False)
        counts.append(calls[0])
    layers, batches = len(tiny_qwen2.model.layers), -(-calib_ids.shape[0] // 2)
    assert counts[1] - counts[0] == layers * batches
    ours = {n: m for n, m in tiny_qwen2.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in other.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name].dequantize(), theirs[name].dequantize()), name
