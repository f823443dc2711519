"""The GPTQ quantizer in the pipeline on tiny models: registration and options, staged
true-sequential Hessians equal a plain per-group forward, quality against RTN, activation
schemes, backend linear algebra, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from conftest import CollectLayerReports
from torch import nn

from qcore.api import ConfigError, build_backend, build_quantizer, load_model, save_model
from qcore.engine.pipeline import run_layerwise
from qcore.models.adapter import LlamaLikeAdapter
from qcore.quant.hessian import HessianAccumulator
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs, QuantScheme, get_scheme
from qcore_gptq.quantizer import GPTQConfig, GPTQQuantizer, _common_parent
from qcore_gptq.solve import GPTQOptions, gptq_quantize

pytestmark = pytest.mark.usefixtures("one_thread")

def _run(model, plugins, calib_ids, method="gptq", options=None, scheme=None, backend=None,
         listeners=()):
    scheme = scheme or get_scheme("W4A16", 32)
    quantizer = build_quantizer(method, scheme, options or {}, plugins)
    for i, obj in enumerate(listeners):
        plugins.add_plugin(obj, name=f"listener-{i}")
    return run_layerwise(model, quantizer, LlamaLikeAdapter(model),
                         backend or build_backend("cpu", plugins), calib_ids, plugins=plugins,
                         progress=False)


def test_registered_with_options(plugins):
    assert plugins.get("quantizer", "gptq") is GPTQQuantizer
    q = build_quantizer("gptq", get_scheme("W4A16"), {"block_size": 64, "act_order": True,
                                                      "static_groups": True}, plugins)
    assert q.config.block_size == 64 and q.config.act_order
    with pytest.raises(ConfigError, match="blok_size"):
        build_quantizer("gptq", get_scheme("W4A16"), {"blok_size": 64}, plugins)
    with pytest.raises(ConfigError, match="damp"):
        build_quantizer("gptq", get_scheme("W4A16"), {"damp": -1}, plugins)
    with pytest.raises(ConfigError, match="KV cache"):
        build_quantizer("gptq", get_scheme("W8A8KV8"), {}, plugins)
    # every option is documented
    for name, field in GPTQConfig.model_fields.items():
        assert field.description, name


def test_cli_set_reaches_config(tiny_llama, tiny_tokenizer, tmp_path, capsys):
    from qcore.cli import main

    src = tmp_path / "tiny"
    tiny_llama.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    out = tmp_path / "out"
    code = main(["quantize", "--model", str(src), "--method", "gptq", "--scheme", "W4A16",
                 "--group-size", "32", "--calib", "pydoc", "--samples", "4", "--seq-len", "32",
                 "--set", "act_order=true", "--set", "static_groups=true",
                 "--set", "block_size=16", "--save", str(out), "--json", "--no-progress"])
    assert code == 0
    assert '"method": "gptq"' in capsys.readouterr().out
    _, _, meta = load_model(str(out))
    assert meta["run"]["method_config"] == {"act_order": True, "static_groups": True,
                                            "block_size": 16}
    assert "self_attn.q_proj.loss" in meta["report"]["layers"][0]["stats"]


def test_common_parent():
    assert _common_parent(["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]) == "mlp"
    assert _common_parent(["self_attn.o_proj", "mlp.up_proj"]) == ""
    assert _common_parent(["self_attn.q_proj", "self_attn.o_proj"]) == "self_attn"


def _naive_hessians(ctx, groups):
    """Reference collection: a full ctx.forward per group with forward hooks, GPTQ applied
    with the same solver, so the staged fast path must give identical weights."""
    for group in groups:
        accs = {}

        def hook(name, _m, x, _y, accs=accs):
            accs.setdefault(name, HessianAccumulator(x.shape[-1])).add(x)

        ctx.forward({n: hook for n in group}, keep_outputs=False)
        for name in group:
            linear = ctx.submodule(name)
            r = gptq_quantize(linear.weight, accs[name].H, ctx.scheme.weights,
                              GPTQOptions(act_order=True, static_groups=True))  # the defaults
            shell = nn.Linear(linear.in_features, linear.out_features, bias=False)
            shell.weight.data = r.Q
            ctx.replace(name, QuantLinear.from_float(shell, ctx.scheme.weights, scale=r.scale,
                                                     zero=r.zero, g_idx=r.g_idx))


class NaiveGPTQ(GPTQQuantizer):
    name = "gptq-naive"

    def quantize_layer(self, ctx):
        _naive_hessians(ctx, self._groups(ctx))
        return {}


@pytest.mark.parametrize("true_sequential", [True, False])
def test_staged_collection_equals_plain_forwards(tiny_model, plugins, calib_ids,
                                                 true_sequential):
    import copy

    other = copy.deepcopy(tiny_model)
    _run(tiny_model, plugins, calib_ids, options={"true_sequential": true_sequential})
    scheme = get_scheme("W4A16", 32)
    naive = NaiveGPTQ(GPTQConfig(true_sequential=true_sequential), scheme)
    run_layerwise(other, naive, LlamaLikeAdapter(other), build_backend("cpu", plugins),
                  calib_ids, plugins=plugins, progress=False)
    fast = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    slow = {n: m for n, m in other.named_modules() if isinstance(m, QuantLinear)}
    assert fast.keys() == slow.keys() and len(fast) == 14
    for name in fast:
        assert torch.allclose(fast[name].dequantize(), slow[name].dequantize(), atol=1e-5), name
        assert (fast[name].codes() != slow[name].codes()).float().mean() < 1e-3, name


def test_true_sequential_uses_quantized_inputs(tiny_llama, plugins, calib_ids):
    """o_proj's Hessian must come from q/k/v already quantized: differs from the one-pass
    (full-precision layer) Hessian."""
    import copy

    seq_model, one_model = tiny_llama, copy.deepcopy(tiny_llama)
    seq = _run(seq_model, plugins, calib_ids, options={"true_sequential": True})
    one = _run(one_model, plugins, calib_ids, options={"true_sequential": False})
    a = seq_model.model.layers[0].self_attn.o_proj.dequantize()
    b = one_model.model.layers[0].self_attn.o_proj.dequantize()
    assert not torch.equal(a, b)
    # first group sees the same (full-precision) inputs in both modes
    assert torch.equal(seq_model.model.layers[0].self_attn.q_proj.dequantize(),
                       one_model.model.layers[0].self_attn.q_proj.dequantize())
    assert seq.layers[0].stats["self_attn.q_proj.loss"] == one.layers[0].stats[
        "self_attn.q_proj.loss"]


@pytest.mark.parametrize("options", [{}, {"act_order": True, "static_groups": True},
                                     {"act_order": True}, {"mse_clip": True}])
def test_gptq_beats_rtn_on_tiny_model(tiny_model, plugins, calib_ids, options):
    import copy

    rtn_model = copy.deepcopy(tiny_model)
    watch = CollectLayerReports()
    report = _run(tiny_model, plugins, calib_ids, options=options, listeners=[watch])
    rtn = _run(rtn_model, plugins, calib_ids, method="rtn")
    assert [r.index for r in watch.reports][:2] == [0, 1]
    for layer, base in zip(report.layers, rtn.layers, strict=True):
        stats = layer.stats
        for name in LlamaLikeAdapter(tiny_model).linear_names():
            assert stats[f"{name}.loss"] <= stats[f"{name}.rtn_loss"] * 1.0001, name
            assert stats[f"{name}.damp"] == pytest.approx(0.01)
            assert stats[f"{name}.seconds"] >= 0
        assert stats["loss"] < 0.9 * stats["rtn_loss"]
        assert layer.relative_mse < base.relative_mse


def test_w8a8_static_activations(tiny_llama, plugins, calib_ids):
    act = QuantArgs(bits=8, symmetric=True, granularity="tensor", dynamic=False)
    scheme = QuantScheme(name="W8A8-static", weights=QuantArgs(bits=8, symmetric=True),
                         activations=act)
    report = _run(tiny_llama, plugins, calib_ids, scheme=scheme)
    q = tiny_llama.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and q.spec.activations == act
    assert float(q.input_scale) > 0
    assert report.layers[1].stats["mlp.down_proj.input_scale"] == pytest.approx(
        float(q.input_scale))
    # q/k/v share one input, so one calibrated scale
    s = report.layers[0].stats
    assert s["self_attn.q_proj.input_scale"] == s["self_attn.k_proj.input_scale"]
    dyn = get_scheme("W8A8")
    other = _run(type(tiny_llama)(tiny_llama.config).eval(), plugins, calib_ids, scheme=dyn)
    assert other.layers[0].relative_mse < 0.05


def test_cholesky_goes_through_backend(tiny_llama, plugins, calib_ids):
    from qcore_backends.cpu.backend import CPUBackend

    class Recording(CPUBackend):
        calls = 0

        def cholesky(self, a, upper=False):
            Recording.calls += 1
            return super().cholesky(a, upper=upper)

    _run(tiny_llama, plugins, calib_ids, backend=Recording())
    # two factorisations per distinct Hessian: q/k/v share one, gate/up another
    assert Recording.calls == 2 * 2 * 4


def test_skip(tiny_llama, plugins, calib_ids):
    _run(tiny_llama, plugins, calib_ids, options={"skip": ["mlp.down_proj"]})
    assert isinstance(tiny_llama.model.layers[0].mlp.down_proj, nn.Linear)
    assert isinstance(tiny_llama.model.layers[0].mlp.up_proj, QuantLinear)


@pytest.mark.parametrize("options", [{"act_order": True, "static_groups": True},
                                     {"act_order": True, "static_groups": False}])
def test_save_load_round_trip_bit_exact(tiny_model, tiny_tokenizer, plugins, calib_ids,
                                        tmp_path, options):
    _run(tiny_model, plugins, calib_ids, options=options)
    path = save_model(tiny_model, tiny_tokenizer, tmp_path / "gptq", {"run": {"method": "gptq"}},
                      plugins=plugins)
    loaded, _, meta = load_model(str(path), plugins)
    assert meta["run"]["method"] == "gptq"
    before = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    after = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert before.keys() == after.keys() and before
    for name, m in before.items():
        for buf in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(m, buf), getattr(after[name], buf)), (name, buf)
        assert torch.equal(m.dequantize(), after[name].dequantize())
    if not options.get("static_groups"):  # act-order groups: g_idx is a real permutation
        g = before["model.layers.0.mlp.down_proj"].g_idx
        assert not torch.equal(g, torch.sort(g).values)
    ids = calib_ids[:2]
    with torch.no_grad():
        assert torch.equal(tiny_model(input_ids=ids).logits, loaded(input_ids=ids).logits)


class _NoLayout(LlamaLikeAdapter):
    MLP = None  # not a known pre-norm layout: the gate/up pass runs the whole layer


class _WrongNorm(LlamaLikeAdapter):
    NORM2 = "input_layernorm"  # claims the wrong norm: the first-batch check must catch it


@pytest.mark.parametrize("adapter", [_NoLayout, _WrongNorm])
def test_mlp_inputs_rebuilt_from_o_inputs_equal_the_layer_pass(tiny_model, plugins,
                                                               calib_ids, adapter):
    """The gate/up pass takes norm2(x + o_proj(o_in)) instead of re-running attention; the
    weights equal those of the full pass (or of the fallback when the layout differs)."""
    import copy

    other = copy.deepcopy(tiny_model)
    calls = {}

    def count(model, key):
        for layer in model.model.layers:
            layer.self_attn.register_forward_pre_hook(
                lambda *_: calls.__setitem__(key, calls.get(key, 0) + 1))

    count(tiny_model, "rebuilt")
    count(other, adapter.__name__)
    scheme = get_scheme("W4A16", 32)
    for model, adapt in ((tiny_model, LlamaLikeAdapter), (other, adapter)):
        quantizer = build_quantizer("gptq", scheme, {"act_order": True}, plugins)
        run_layerwise(model, quantizer, adapt(model), build_backend("cpu", plugins),
                      calib_ids, plugins=plugins, batch_size=2, progress=False)
    # attention calls per layer, 4 batches: error reference 2, q/k/v pass 4 (the pre-hook
    # fires on entry), o pass 4, gate/up pass 4 (rebuilt: 1, the check on the first batch;
    # a failed check: 1 + 4), quantized outputs 4 (rebuilt: assembled from h + down(d),
    # checked on the first batch: 1)
    full = 2 + 4 + 4 + 4 + 4
    expected = full + 1 if adapter is _WrongNorm else full
    assert calls == {"rebuilt": 2 * (full - 6), adapter.__name__: 2 * expected}
    ours = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    for name, module in other.named_modules():
        if isinstance(module, QuantLinear):
            assert torch.equal(ours[name].dequantize(), module.dequantize()), name


class _CheckOutputs(GPTQQuantizer):
    """Checks whether the quantizer assembled the outputs itself."""

    name = "gptq-check"
    assembled: list[bool] = []

    def quantize_layer(self, ctx):
        stats = super().quantize_layer(ctx)
        self.assembled.append(ctx.quantized_outputs is not None)
        return stats


def test_assembled_outputs_equal_the_layer_forward(tiny_model, plugins, calib_ids):
    """The next layer's inputs assembled as h + down(d) are bit-identical to a forward of
    the quantized layer (what a budget too small for the kept activations falls back to):
    every later layer's weights and errors come out the same."""
    import copy

    other = copy.deepcopy(tiny_model)
    scheme = get_scheme("W4A16", 32)
    reports, assembled = [], []
    for model, budget in ((tiny_model, 1024.0), (other, 0.0)):
        _CheckOutputs.assembled = []
        quantizer = _CheckOutputs(GPTQConfig(reuse_budget_mb=budget), scheme)
        reports.append(run_layerwise(model, quantizer, LlamaLikeAdapter(model),
                                     build_backend("cpu", plugins), calib_ids,
                                     plugins=plugins, batch_size=2, progress=False))
        assembled.append(_CheckOutputs.assembled)
    assert assembled == [[True, True], [False, False]]
    assert [r.relative_mse for r in reports[0].layers] == \
        [r.relative_mse for r in reports[1].layers]
    ours = {n: m for n, m in tiny_model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in other.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        assert torch.equal(ours[name].dequantize(), theirs[name].dequantize()), name


def test_shared_hessian_solve_equals_separate_solves():
    """q/k/v (and gate/up) are solved stacked row-wise in one call: GPTQ treats rows
    independently, so each linear's result equals its own solve (float64: no rounding
    differences from the larger matmuls)."""
    torch.manual_seed(0)
    x = torch.randn(512, 64, dtype=torch.float64)
    acc = HessianAccumulator(64, dtype=torch.float64)
    acc.add(x)
    weights = [torch.randn(rows, 64, dtype=torch.float64) for rows in (48, 16, 16)]
    args = get_scheme("W4A16", 16).weights
    for act_order in (False, True):
        options = GPTQOptions(act_order=act_order, static_groups=act_order, block_size=32)
        stacked = gptq_quantize(torch.cat(weights), acc.H, args, options, loss=False)
        start = 0
        for w in weights:
            alone = gptq_quantize(w, acc.H, args, options)
            rows = slice(start, start + w.shape[0])
            start = rows.stop
            assert torch.allclose(stacked.Q[rows], alone.Q, atol=1e-12)
            assert torch.allclose(stacked.scale[rows], alone.scale, rtol=1e-12)
            assert torch.equal(stacked.g_idx, alone.g_idx)
