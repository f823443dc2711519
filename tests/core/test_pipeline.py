import pytest
import torch

from qcore import api, hookimpl
from qcore.interfaces import Quantizer
from qcore.pipeline import capture_first_layer_inputs, check_group_size, run_layerwise
from qcore.quant.linear import QuantLinear
from qcore.schemes import get_scheme


class Identity(Quantizer):
    """Touches nothing: the layer-wise loop must then reproduce the model exactly."""

    name = "identity"

    def quantize_layer(self, ctx):
        return {"batches": len(ctx.inputs)}


class Recorder:
    def __init__(self):
        self.layers, self.models = [], []

    @hookimpl
    def qcore_layer_quantized(self, report):
        self.layers.append(report)

    @hookimpl
    def qcore_model_quantized(self, report, model):
        self.models.append(report)


def _setup(model, plugins, method="rtn", scheme="W8A16"):
    quantizer = (Identity(Identity.Config(), get_scheme(scheme)) if method == "identity"
                 else api.build_quantizer(method, get_scheme(scheme), {}, plugins))
    return quantizer, api.adapter_for(model, plugins), api.build_backend("cpu", plugins)


def test_captured_inputs_are_the_embeddings(tiny_llama, plugins, calib_ids):
    adapter = api.adapter_for(tiny_llama, plugins)
    backend = api.build_backend("cpu", plugins)
    hidden, kwargs = capture_first_layer_inputs(tiny_llama, adapter, calib_ids, backend, 3)
    assert [h.shape[0] for h in hidden] == [3, 3, 2]
    torch.testing.assert_close(torch.cat(hidden), tiny_llama.model.embed_tokens(calib_ids))
    assert "position_embeddings" in kwargs[0]


def test_layerwise_loop_reproduces_the_model_and_fires_events(tiny_model, plugins, calib_ids):
    ref = tiny_model(calib_ids).logits
    quantizer, adapter, backend = _setup(tiny_model, plugins, "identity")
    rec = Recorder()
    plugins.add_plugin(rec, name="recorder")
    report = run_layerwise(tiny_model, quantizer, adapter, backend, calib_ids, plugins=plugins,
                           batch_size=4, progress=False)
    torch.testing.assert_close(tiny_model(calib_ids).logits, ref)
    assert [r.index for r in rec.layers] == [0, 1]
    assert all(r.relative_mse == 0.0 and r.stats == {"batches": 2} for r in rec.layers)
    assert rec.models == [report] and report.peak_rss_mb > 0


def test_layer_errors_match_a_direct_computation(tiny_llama, plugins, calib_ids):
    fp = tiny_llama.model.layers[0]
    hidden, kwargs = capture_first_layer_inputs(
        tiny_llama, api.adapter_for(tiny_llama, plugins), calib_ids,
        api.build_backend("cpu", plugins), 8)
    ref_out = fp(hidden[0], **kwargs[0])
    ref_out = ref_out[0] if isinstance(ref_out, tuple) else ref_out
    quantizer, adapter, backend = _setup(tiny_llama, plugins, "rtn", "W4A16")
    quantizer.scheme = get_scheme("W4A16", group_size=32)
    report = run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids, plugins=plugins,
                           batch_size=8, progress=False)
    q_out = tiny_llama.model.layers[0](hidden[0], **kwargs[0])
    q_out = q_out[0] if isinstance(q_out, tuple) else q_out
    expected = float((q_out - ref_out).pow(2).sum() / ref_out.pow(2).sum())
    assert report.layers[0].relative_mse == pytest.approx(expected, rel=1e-4)
    assert isinstance(tiny_llama.model.layers[0].self_attn.q_proj, QuantLinear)


def test_full_precision_propagation_differs_from_quantized(plugins, calib_ids):
    from conftest import make_tiny_model

    errors = {}
    for mode in ("quantized", "full"):
        model = make_tiny_model("llama", num_hidden_layers=3)
        quantizer, adapter, backend = _setup(model, plugins, "rtn", "W4A16")
        quantizer.scheme = get_scheme("W4A16", group_size=16)
        report = run_layerwise(model, quantizer, adapter, backend, calib_ids, plugins=plugins,
                               propagation=mode, progress=False)
        errors[mode] = [r.relative_mse for r in report.layers]
    assert errors["quantized"][0] == pytest.approx(errors["full"][0])
    assert errors["quantized"][1:] != errors["full"][1:]


def test_group_size_that_does_not_divide_is_reported_with_layer_names(tiny_llama, plugins):
    adapter = api.adapter_for(tiny_llama, plugins)
    with pytest.raises(ValueError) as err:
        check_group_size(tiny_llama, adapter, get_scheme("W4A16"))  # 128 vs 64/128 inputs
    msg = str(err.value)
    assert "group_size 128" in msg and "self_attn.q_proj (64)" in msg and "mlp.down_proj" \
        not in msg
    check_group_size(tiny_llama, adapter, get_scheme("W4A16", group_size=32))
