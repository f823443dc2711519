import math

import pytest
import torch

from qcore import api, hookimpl
from qcore.engine.pipeline import check_group_size, run_layerwise
from qcore.interfaces import Quantizer
from qcore.models.capture import capture_first_layer_inputs
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
    assert "`group_size` 128" in msg and "self_attn.q_proj (64)" in msg and "mlp.down_proj" \
        not in msg
    check_group_size(tiny_llama, adapter, get_scheme("W4A16", group_size=32))


@pytest.mark.parametrize("error_windows, expected_windows", [(None, 8), (4, 4), (3, 4), (1, 2)])
def test_error_is_measured_on_the_first_windows(tiny_llama, plugins, calib_ids, error_windows,
                                                expected_windows):
    """relative_mse covers the first batches holding error_windows windows (batch size 2)."""
    import copy

    fp = copy.deepcopy(tiny_llama.model.layers[0])
    hidden, kwargs = capture_first_layer_inputs(
        tiny_llama, api.adapter_for(tiny_llama, plugins), calib_ids,
        api.build_backend("cpu", plugins), 2)
    quantizer, adapter, backend = _setup(tiny_llama, plugins, "rtn", "W4A16")
    quantizer.scheme = get_scheme("W4A16", group_size=32)
    report = run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids, plugins=plugins,
                           batch_size=2, error_windows=error_windows, progress=False)

    def outputs(layer):
        ys = [layer(h, **kw) for h, kw in zip(hidden, kwargs, strict=True)]
        return torch.cat([y[0] if isinstance(y, tuple) else y for y in ys])[:expected_windows]

    ref, q = outputs(fp), outputs(tiny_llama.model.layers[0])
    expected = float((q - ref).pow(2).sum() / ref.pow(2).sum())
    assert report.layers[0].error_windows == expected_windows
    assert report.layers[0].relative_mse == pytest.approx(expected, rel=1e-4)


def test_error_windows_must_not_be_negative(tiny_llama, plugins, calib_ids):
    quantizer, adapter, backend = _setup(tiny_llama, plugins)
    with pytest.raises(ValueError, match=r"error_windows\n.*greater than or equal to 0"):
        run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids, error_windows=-1,
                      progress=False)


def test_zero_error_windows_measure_nothing(tiny_llama, plugins, calib_ids):
    quantizer, adapter, backend = _setup(tiny_llama, plugins)
    report = run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids,
                           error_windows=0, progress=False)
    assert all(math.isnan(x.relative_mse) and x.error_windows == 0 for x in report.layers)
    again = type(report.layers[0]).model_validate_json(report.layers[0].model_dump_json())
    assert math.isnan(again.relative_mse)  # JSON null reads back as "not measured"


class ReadsTargets(Quantizer):
    name = "reads-targets"

    def quantize_layer(self, ctx):
        return {"targets": len(ctx.fp_outputs), "batches": len(ctx.inputs)}


def test_fp_outputs_need_a_declaration(tiny_llama, plugins, calib_ids):
    adapter = api.adapter_for(tiny_llama, plugins)
    backend = api.build_backend("cpu", plugins)
    quantizer = ReadsTargets(ReadsTargets.Config(), get_scheme("W8A16"))
    with pytest.raises(RuntimeError, match="declares needs_fp_outputs = True"):
        run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids, batch_size=2,
                      progress=False)
    ReadsTargets.needs_fp_outputs = True
    try:
        report = run_layerwise(tiny_llama, quantizer, adapter, backend, calib_ids,
                               batch_size=2, progress=False)
    finally:
        ReadsTargets.needs_fp_outputs = False
    assert report.layers[0].stats == {"targets": 4, "batches": 4}


def test_replaced_float_weights_are_handed_to_the_backend(tiny_llama, plugins, calib_ids):
    """After each layer the backend may release the host memory of the tensors the layer
    no longer holds: the replaced linears' weights, not the norms it keeps."""
    from qcore_backends.cpu.backend import CPUBackend

    released: list[list[tuple[int, int]]] = []

    class Spy(CPUBackend):
        def release_host_memory(self, ranges):
            released.append(list(ranges))
            super().release_host_memory(ranges)

    adapter = api.adapter_for(tiny_llama, plugins)
    layers = tiny_llama.model.layers
    old = [layer.get_submodule(n).weight for layer in layers
           for n in adapter.linear_names()]  # kept alive: no address reuse
    weights = {(w.data_ptr(), w.numel() * w.element_size()) for w in old}
    norms = {(p.data_ptr(), p.numel() * 4) for layer in layers
             for n, p in layer.named_parameters() if "norm" in n}
    quantizer = api.build_quantizer("rtn", get_scheme("W8A16"), {}, plugins)
    run_layerwise(tiny_llama, quantizer, adapter, Spy(), calib_ids, plugins=plugins,
                  progress=False)
    embedding = tiny_llama.model.embed_tokens.weight
    # first the embedding rows the calibration read, then each replaced linear's weight
    # (when it is replaced, and again with the rest of its layer)
    assert released[0] == [(embedding.data_ptr(), embedding.numel() * 4)]
    later = {r for ranges in released[1:] for r in ranges}
    assert later == weights and not later & norms


def test_precision_restores_the_model_dtype_but_keeps_float32_quantization_state():
    from torch import nn

    from qcore.engine.precision import Precision

    layer = nn.ModuleDict({"norm": nn.LayerNorm(8), "proj": nn.Linear(8, 8)}).to(torch.bfloat16)
    precision = Precision(storage=torch.bfloat16, work=torch.float32)
    precision.enter(layer, torch.device("cpu"))
    assert layer["proj"].weight.dtype == torch.float32
    args = get_scheme("W4A16", 8).weights
    layer["proj"] = QuantLinear.from_float(layer["proj"], args)
    precision.restore(layer)
    assert layer["norm"].weight.dtype == torch.bfloat16
    assert layer["proj"].bias.dtype == torch.bfloat16
    assert layer["proj"].scales.dtype == torch.float32  # computed in float32 on purpose
    same = Precision(storage=torch.float32, work=torch.float32)
    x = [torch.randn(2, 8)]
    assert same.cast(x) is x and same.store(x) is x
    assert precision.cast({"a": (torch.ones(1, dtype=torch.bfloat16), torch.ones(1).long())}
                          )["a"][0].dtype == torch.float32
