"""FlatQuant on tiny models: exact equivalence without quantization, training, folding,
save/load, options."""

import copy
from contextlib import ExitStack

import pytest
import torch
from conftest import CollectLayerReports
from torch import nn

from qcore.api import ConfigError, build_backend, build_quantizer, load_model, save_model
from qcore.engine.pipeline import run_layerwise
from qcore.interfaces import UnsupportedScheme
from qcore.models.adapter import LlamaLikeAdapter
from qcore.quant.kvcache import (
    ATTN_IMPLEMENTATION,
    KVCacheQuantizer,
    KVCacheSpec,
    register_attention,
)
from qcore.quant.linear import QuantLinear, replace_module
from qcore.schemes import QuantArgs, QuantScheme, get_scheme
from qcore_flatquant.config import FlatQuantConfig
from qcore_flatquant.folding import fold_layer
from qcore_flatquant.learnables import LayerTransforms
from qcore_flatquant.training import training_layer
from qcore_flatquant.transforms import FlatQuantKeyTransform, FlatQuantTransform

A = LlamaLikeAdapter
ROLES = {"q": A.Q, "k": A.K, "v": A.V, "o": A.O, "gate": A.GATE, "up": A.UP, "down": A.DOWN}


pytestmark = pytest.mark.usefixtures("one_thread")


def _random_owners(model, seed=0, **options):
    """Random (non-orthogonal, non-trivial) transforms and scales for every layer."""
    cfg = FlatQuantConfig(**options)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads
    owners = []
    for i, layer in enumerate(model.model.layers):
        gen = torch.Generator().manual_seed(seed + i)
        owner = LayerTransforms(layer, ROLES, c.num_attention_heads, head_dim,
                                c.num_key_value_heads, cfg, True, gen)
        with torch.no_grad():
            for p in owner.parameters():
                if p.dim() == 2 and p.shape[0] == p.shape[1]:
                    p.add_(0.2 * torch.randn(p.shape, generator=gen))
            for k in (owner.ln, owner.up, owner.down):
                k.diag.copy_(torch.rand(k.diag.shape, generator=gen) * 2 + 0.25)
        owners.append(owner)
    return owners


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_transformed_model_equals_original_without_quantization(tiny_model):
    register_attention()
    tiny_model.set_attn_implementation(ATTN_IMPLEMENTATION)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    ref = _logits(tiny_model, ids)
    owners = _random_owners(tiny_model)
    # training-time forward with every quantizer off
    with ExitStack() as stack:
        for layer, owner in zip(tiny_model.model.layers, owners, strict=True):
            stack.enter_context(training_layer(layer, owner, A.ATTN, None))
        assert _rel(_logits(tiny_model, ids), ref) < 1e-4
    # folded (float64) weights + online transforms + key transform, no clipping
    folded = copy.deepcopy(tiny_model)
    for layer, owner in zip(folded.model.layers, owners, strict=True):
        transforms, key = fold_layer(layer, owner, (A.NORM1, A.NORM2), act=None, clip=False)
        for name, tr in transforms.items():
            replace_module(layer, name, nn.Sequential(tr, layer.get_submodule(name)))
        spec = KVCacheSpec(keys=None, values=None, key_transform=key.spec())
        layer.self_attn.qcore_kv = KVCacheQuantizer(spec, key_transform=key)
    assert _rel(_logits(folded, ids), ref) < 1e-4


def _run(model, scheme, calib_ids, plugins, **options):
    quantizer = build_quantizer("flatquant", get_scheme(scheme) if isinstance(scheme, str)
                                else scheme, options, plugins)
    watch = CollectLayerReports()
    plugins.add_plugin(watch, name=f"watch-{id(watch)}")
    try:
        run_layerwise(model, quantizer, LlamaLikeAdapter(model), build_backend("cpu", plugins),
                      calib_ids, plugins=plugins, batch_size=4, error_windows=None, progress=False)
    finally:
        plugins.remove_plugin(f"watch-{id(watch)}")
    return watch.reports


def test_training_loss_decreases(tiny_llama, calib_ids, plugins):
    reports = _run(tiny_llama, "W4A4", calib_ids, plugins, epochs=4, batch_size=2)
    assert len(reports) == 2
    for r in reports:
        s = r.stats
        assert s["steps"] == 4 * 4
        assert len(s["epoch_losses"]) == 4
        assert s["loss_end"] < 0.95 * s["loss_start"], (r.name, s["loss_start"], s["loss_end"])
        assert {"loss_start", "loss_end", "train_seconds"} <= set(s)


@pytest.mark.parametrize("kind, scheme, options", [
    ("tiny_llama", "W4A4", {}), ("tiny_qwen2", "W4A4KV4", {}), ("tiny_llama", "W8A8", {}),
    ("tiny_qwen2", "W4A4", {"ascend": True})])
def test_fold_then_quantize_equals_training_forward(request, calib_ids, plugins, kind, scheme,
                                                    options):
    """The pipeline's error of the folded, quantized layer (QuantLinear + online transforms)
    equals the training-time fake-quantized layer's error (float32 vs float64 folding can
    flip a rare rounding tie)."""
    tiny_model = request.getfixturevalue(kind)
    reports = _run(tiny_model, scheme, calib_ids, plugins, epochs=1, **options)
    for r in reports:
        train = r.stats["train_relative_mse_end"]
        assert abs(r.relative_mse - train) <= 0.01 * train, (r.name, r.relative_mse, train)
    layer = tiny_model.model.layers[0]
    q = layer.self_attn.q_proj
    assert isinstance(q, QuantLinear) and isinstance(q.input_transform, FlatQuantTransform)
    assert q.spec.input_transform.type == "flatquant_kron"
    assert isinstance(layer.self_attn.o_proj.input_transform, FlatQuantTransform)
    if scheme == "W4A4KV4":
        assert isinstance(layer.self_attn.qcore_kv.key_transform, FlatQuantKeyTransform)


def test_ascend_variant_is_msmodelslims_flatquant(tiny_qwen2, calib_ids, plugins):
    """ascend=true: symmetric per-token int4 activations whose scale is the learned ratio
    (one per fused input) x max|x| / 7, codes down to -8; o_proj's transform the identity
    over FlatQuant's factorization of its inputs."""
    reports = _run(tiny_qwen2, "W4A4", calib_ids, plugins, epochs=2, ascend=True)
    assert all(r.stats["loss_end"] < r.stats["loss_start"] for r in reports)
    for layer in tiny_qwen2.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        acts = {n: getattr(m, n).spec.activations for m, names in
                ((attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                 (mlp, ("gate_proj", "up_proj", "down_proj"))) for n in names}
        assert all(a.symmetric and a.bits == 4 and a.symmetric_range == "signed"
                   for a in acts.values())
        assert acts["q_proj"] == acts["k_proj"] == acts["v_proj"]
        assert acts["gate_proj"] == acts["up_proj"]
        untrained = float(torch.sigmoid(torch.tensor(4.0)))
        for a in acts.values():  # learned (moved from the init), a float32 value
            assert 0 < a.clip_ratio < 1 and a.clip_ratio != untrained
            assert a.clip_ratio == float(torch.tensor(a.clip_ratio))
        o = attn.o_proj.input_transform
        assert o.clip == "none" and o.has_right
        assert torch.equal(o.left, torch.eye(o.n1)) and torch.equal(o.right, torch.eye(o.n2))
        for name in ("q_proj", "k_proj", "v_proj"):  # one transform for the fused input
            t = getattr(attn, name).input_transform
            assert torch.equal(t.left, attn.q_proj.input_transform.left) and t.clip == "none"
    # the deployed activation quantizer: scale = ratio * max|x| / 7, codes in [-8, 7]; a
    # token whose largest magnitude is negative reaches -8 once the ratio is below 7 / 7.5
    o = tiny_qwen2.model.layers[0].self_attn.o_proj
    ratio = 0.8  # a short training leaves the ratios near their init, sigmoid(4) = 0.98
    o.spec = o.spec.model_copy(update={"activations": o.spec.activations.model_copy(
        update={"clip_ratio": ratio})})
    x = torch.randn(5, o.in_features, generator=torch.Generator().manual_seed(1))
    x[:, 3] = -10 * x.abs().amax(dim=-1)
    scale = ratio * x.abs().amax(dim=-1, keepdim=True) / 7
    codes = torch.clamp(torch.round(x / scale), -8, 7)
    assert bool((codes[:, 3] == -8).all())
    torch.testing.assert_close(o.quantize_input(x), codes * scale, rtol=0, atol=1e-6)


def test_training_fake_quant_of_the_ascend_variant_is_the_deployed_quantizer():
    from qcore.quant.qparams import fake_quantize_activation
    from qcore_flatquant.learnables import fake_quant_tokens_ste

    act = QuantArgs(bits=4, symmetric=True, granularity="token", dynamic=True)
    x = torch.randn(7, 48, generator=torch.Generator().manual_seed(2)) * 3
    ratio = torch.sigmoid(torch.tensor(0.7))
    deployed = fake_quantize_activation(
        x, act.model_copy(update={"clip_ratio": float(ratio)}))
    assert torch.equal(fake_quant_tokens_ste(x, act, ratio, ratio, clamp=False), deployed)


def test_ascend_variant_needs_msmodelslims_w4a4(plugins):
    with pytest.raises(ConfigError, match=r"ascend=true writes msModelSlim's "
                                          r"W4A4_FLATQUANT_DYNAMIC.*scheme W4A4KV4.*KV cache"):
        build_quantizer("flatquant", get_scheme("W4A4KV4"), {"ascend": True}, plugins)
    with pytest.raises(ConfigError, match=r"scheme W4A16 has weights int4 asym"):
        build_quantizer("flatquant", get_scheme("W4A16"), {"ascend": True}, plugins)
    quantizer = build_quantizer("flatquant", get_scheme("W4A4"), {"ascend": True}, plugins)
    assert quantizer.scheme.activations.symmetric and quantizer.scheme.name == "W4A4-ascend"


def test_flatquant_beats_rtn_w4a4_on_tiny_model(tiny_llama, calib_ids, plugins):
    rtn_model = copy.deepcopy(tiny_llama)
    fq = _run(tiny_llama, "W4A4", calib_ids, plugins, epochs=2)
    rtn = build_quantizer("rtn", get_scheme("W4A4"), {}, plugins)
    report = run_layerwise(rtn_model, rtn, LlamaLikeAdapter(rtn_model),
                           build_backend("cpu", plugins), calib_ids, progress=False)
    for a, b in zip(fq, report.layers, strict=True):
        assert a.relative_mse < b.relative_mse


def test_save_load_round_trip_is_exact(tiny_qwen2, calib_ids, plugins, tiny_tokenizer, tmp_path):
    _run(tiny_qwen2, "W4A4KV4", calib_ids, plugins, epochs=1)
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    before = _logits(tiny_qwen2, ids)
    path = save_model(tiny_qwen2, tiny_tokenizer, tmp_path / "fq", {"run": {"method": "flatquant"}},
                      plugins=plugins)
    loaded, _, meta = load_model(str(path), plugins)
    assert meta["quantized_layers"]["model.layers.0.self_attn.q_proj"]["input_transform"][
        "type"] == "flatquant_kron"
    kv = loaded.model.layers[1].self_attn.qcore_kv
    assert isinstance(kv.key_transform, FlatQuantKeyTransform)
    assert torch.equal(_logits(loaded, ids), before)


def test_options_and_schemes(plugins):
    q = build_quantizer("flatquant", get_scheme("W4A4"), {"epochs": 2, "lr": 1e-3}, plugins)
    assert q.config.epochs == 2 and q.config.batch_size == 4 and q.config.diag_alpha == 0.3
    assert q.propagation == "full"
    with pytest.raises(ConfigError, match="epoch"):
        build_quantizer("flatquant", get_scheme("W4A4"), {"epoch": 2}, plugins)
    static = QuantScheme(name="static", weights=QuantArgs(bits=8),
                         activations=QuantArgs(bits=8, granularity="tensor"))
    with pytest.raises((UnsupportedScheme, ConfigError), match="per token"):
        build_quantizer("flatquant", static, {}, plugins)


def test_gptq_composition_lowers_error(tiny_llama, calib_ids, plugins):
    """weight_method=gptq rounds the folded weights with the gptq plugin's solver against the
    Hessian of the transformed, quantized inputs: never worse than RTN of the same
    transforms on the calibration data, and still a QuantLinear with its transform."""
    if "gptq" not in plugins.registry("solver"):
        pytest.skip("no gptq weight solver registered")
    rtn_model = copy.deepcopy(tiny_llama)
    rtn = _run(rtn_model, "W4A4", calib_ids, plugins, epochs=0)
    gptq = _run(tiny_llama, "W4A4", calib_ids, plugins, epochs=0, weight_method="gptq",
                weight_options={"act_order": True, "static_groups": True})
    assert sum(r.relative_mse for r in gptq) < sum(r.relative_mse for r in rtn)
    assert {k.split(".", 1)[1].rsplit(".", 1)[0] for k in gptq[0].stats
            if k.startswith("gptq.") and k.endswith(".loss")} == set(ROLES.values())
    q = tiny_llama.model.layers[1].mlp.down_proj
    assert isinstance(q, QuantLinear) and isinstance(q.input_transform, FlatQuantTransform)
    with pytest.raises(ConfigError, match="weight_method"):
        build_quantizer("flatquant", get_scheme("W4A4"), {"weight_method": "awq"}, plugins)


@pytest.mark.parametrize("scheme, options", [("W4A4", {}), ("W4A4", {"ascend": True}),
                                             ("W4A16", {})])
def test_fused_training_step_equals_eager(tiny_llama, scheme, options):
    """torch.compile's fused fake quantizers (fuse=true) compute the eager step: the same
    fake-quantized logits and the same gradient for every learnable."""
    register_attention()
    tiny_llama.set_attn_implementation(ATTN_IMPLEMENTATION)
    q_scheme = get_scheme(scheme, 32 if scheme.endswith("A16") else None)  # 64 features
    if options.get("ascend"):
        q_scheme = q_scheme.model_copy(update={"activations": q_scheme.activations.model_copy(
            update={"symmetric": True})})
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    results = []
    for fuse in (False, True):
        owners = _random_owners(tiny_llama, **options)
        for owner in owners:
            owner.fuse = fuse
        with ExitStack() as stack:
            for layer, owner in zip(tiny_llama.model.layers, owners, strict=True):
                stack.enter_context(training_layer(layer, owner, A.ATTN, q_scheme))
            logits = tiny_llama(input_ids=ids, use_cache=False).logits
            logits.pow(2).mean().backward()
        grads = [(n, p.grad.clone()) for o in owners for n, p in o.named_parameters()
                 if p.grad is not None]
        results.append((logits.detach(), grads))
    (eager, eager_grads), (fused_logits, fused_grads) = results
    assert _rel(fused_logits, eager) < 1e-5
    assert len(fused_grads) == len(eager_grads) > 0
    for (name, g_fused), (_, g_eager) in zip(fused_grads, eager_grads, strict=True):
        # absolute floor: the key transform's true gradient is 0 without a quantized cache
        # (P_k and its inverse cancel in q.k); both sides hold rounding noise of ~1e-10
        err = float((g_fused - g_eager).norm())
        assert err <= 1e-4 * float(g_eager.norm()) + 1e-8, (name, err, float(g_eager.norm()))


def test_a_compiler_failure_falls_back_to_eager_unless_fuse_was_asked(tiny_llama, monkeypatch,
                                                                      caplog):
    """Without a working torch.compile (no C++ compiler, say) the default trains eagerly
    with one warning; fuse=true raises."""
    from torch._inductor.exc import InductorError

    from qcore_flatquant import learnables

    monkeypatch.setattr(learnables, "fused", _broken_compile([]))
    x = torch.randn(3, 8)
    args = QuantArgs(bits=4, symmetric=False, granularity="token")
    owner = _random_owners(tiny_llama)[0]
    owner.fuse = True  # what the default resolves to on the CPU
    eager = learnables.fake_quant_tokens_ste(x, args, 1.0, 1.0)
    assert torch.equal(owner.call(learnables.fake_quant_tokens_ste, x, args, 1.0, 1.0), eager)
    assert not owner.fuse and "no C++ compiler" in owner.fallback.failure
    assert "torch.compile failed" in caplog.text and "no C++ compiler" in caplog.text
    asked = _random_owners(tiny_llama, fuse=True)[0]
    with pytest.raises(InductorError):
        asked.call(learnables.fake_quant_tokens_ste, x, args, 1.0, 1.0)


def _broken_compile(calls):
    """A stand-in for ``learnables.fused`` whose compiled functions fail (recorded in
    ``calls``)."""
    from torch._inductor.exc import InductorError

    def broken(fn):
        def call(*args, **kwargs):
            calls.append(fn.__name__)
            raise InductorError(RuntimeError("no C++ compiler"), "")
        return call

    return broken


def test_a_compiler_failure_is_tried_once_per_run(tiny_llama, calib_ids, plugins, monkeypatch,
                                                  caplog):
    """The default fuse (on, on the CPU) tries to compile in the first layer only: after a
    failure the run's later layers train eagerly without trying again."""
    from qcore_flatquant import learnables

    calls = []
    monkeypatch.setattr(learnables, "fused", _broken_compile(calls))
    reports = _run(tiny_llama, "W4A4", calib_ids, plugins, epochs=1)
    assert len(reports) == 2 and len(calls) == 1
    assert caplog.text.count("torch.compile failed") == 1


def test_saved_matrices_resume_an_interrupted_run_bit_for_bit(tiny_llama, calib_ids, plugins,
                                                              tmp_path):
    """A run with ``matrices`` writes one file per trained layer; a rerun loads them instead
    of training, so resuming after layer 0 gives the model an uninterrupted run gives."""
    folder = tmp_path / "matrices"
    options = {"epochs": 2, "batch_size": 2, "fuse": False}
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    plain = copy.deepcopy(tiny_llama)
    _run(plain, "W4A4", calib_ids, plugins, **options)
    first = copy.deepcopy(tiny_llama)
    r1 = _run(first, "W4A4", calib_ids, plugins, matrices=str(folder), **options)
    assert sorted(p.name for p in folder.iterdir()) == ["model.layers.0.safetensors",
                                                        "model.layers.1.safetensors"]
    assert torch.equal(_logits(first, ids), _logits(plain, ids))  # saving changes nothing
    (folder / "model.layers.1.safetensors").unlink()  # interrupted while training layer 1
    resumed = copy.deepcopy(tiny_llama)
    r2 = _run(resumed, "W4A4", calib_ids, plugins, matrices=str(folder), **options)
    assert r2[0].stats["reloaded"] is True and "reloaded" not in r2[1].stats
    assert r2[0].stats["loss_end"] == r1[0].stats["loss_end"]  # the saved statistics
    assert r2[0].stats["epoch_losses"] == r1[0].stats["epoch_losses"]
    assert torch.equal(_logits(resumed, ids), _logits(first, ids))
    assert (folder / "model.layers.1.safetensors").exists()


def test_saved_matrices_of_another_run_are_refused_naming_the_difference(
        tiny_llama, calib_ids, plugins, tmp_path):
    folder = str(tmp_path / "matrices")
    base = {"epochs": 1, "batch_size": 4, "fuse": False, "matrices": folder}

    def run(model=tiny_llama, scheme="W4A4", ids=calib_ids, **changes):
        return _run(copy.deepcopy(model), scheme, ids, plugins, **{**base, **changes})

    run()
    with pytest.raises(ConfigError, match=r"training\.epochs: saved 1, now 2"):
        run(epochs=2)
    with pytest.raises(ConfigError, match=r"model\.layers\.0\.safetensors .*scheme\."):
        run(scheme="W8A8")
    with pytest.raises(ConfigError, match=r"inputs\.sum_abs"):
        run(ids=(calib_ids + 1) % 512)
    other = copy.deepcopy(tiny_llama)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    with pytest.raises(ConfigError, match=r"weights\.sum_abs"):
        run(model=other)
    # what acts only after training may change: another weight solver reuses the file
    reports = run(weight_method="gptq")
    assert all(r.stats["reloaded"] for r in reports)
