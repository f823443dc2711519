import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear
from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import QuantArgs, QuantScheme, get_scheme


def _run(model, tokenizer, plugins, scheme, group=None, options=None):
    cfg = RunConfig(model="tiny", method="rtn", scheme=scheme, group_size=group,
                    method_config=options or {},
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                  seq_len=32))
    return api.quantize(cfg, model=model, tokenizer=tokenizer, plugins=plugins, progress=False)


@pytest.mark.parametrize("scheme", [
    QuantScheme(weights=QuantArgs(bits=3, symmetric=False, granularity="group", group_size=16)),
    QuantScheme(weights=QuantArgs(bits=4, symmetric=True, granularity="channel")),
    QuantScheme(weights=QuantArgs(bits=2, symmetric=False, granularity="channel")),
    QuantScheme(weights=QuantArgs(bits=8, symmetric=True, granularity="group", group_size=32)),
])
def test_rtn_layers_hold_exactly_the_rtn_weights(tiny_model, tiny_tokenizer, plugins, scheme):
    originals = {n: m.weight.detach().clone() for n, m in tiny_model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "layers" in n}
    result = _run(tiny_model, tiny_tokenizer, plugins, scheme)
    for name, w in originals.items():
        q = result.model.get_submodule(name)
        assert isinstance(q, QuantLinear)
        torch.testing.assert_close(q.dequantize(), fake_quantize_weight(w, scheme.weights),
                                   rtol=0, atol=1e-6)
    assert not isinstance(result.model.lm_head, QuantLinear)  # head stays in full precision


def test_more_bits_less_error(tiny_tokenizer, plugins):
    from conftest import make_tiny_model

    errs = []
    for bits in (2, 3, 4, 8):
        scheme = QuantScheme(weights=QuantArgs(bits=bits, symmetric=False,
                                               granularity="channel"))
        report = _run(make_tiny_model("llama"), tiny_tokenizer, plugins, scheme).report
        errs.append(report.layers[0].relative_mse)
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-3


def test_dynamic_per_token_and_static_per_tensor_activations(tiny_llama, tiny_tokenizer,
                                                             plugins):
    static = QuantScheme(weights=QuantArgs(bits=8),
                         activations=QuantArgs(bits=8, granularity="tensor", dynamic=False))
    result = _run(tiny_llama, tiny_tokenizer, plugins, static)
    stats = result.report.layers[0].stats
    q = result.model.model.layers[0].self_attn.q_proj
    assert float(q.input_scale) == pytest.approx(stats["self_attn.q_proj.input_scale"])
    assert float(q.input_scale) > 0 and float(q.input_zero) == 128.0
    from conftest import make_tiny_model

    dyn = _run(make_tiny_model("llama"), tiny_tokenizer, plugins, "W8A8")
    assert dyn.model.model.layers[0].mlp.up_proj.spec.activations.granularity == "token"
    assert dyn.report.layers[0].relative_mse < 1e-2
    assert result.report.layers[0].relative_mse < 1e-2


def test_skip_option_and_unknown_option(tiny_llama, tiny_tokenizer, plugins):
    result = _run(tiny_llama, tiny_tokenizer, plugins, "W8A16",
                  options={"skip": ["mlp.down_proj"]})
    assert isinstance(result.model.model.layers[0].mlp.down_proj, torch.nn.Linear)
    with pytest.raises(api.ConfigError, match="skp"):
        _run(tiny_llama, tiny_tokenizer, plugins, "W8A16", options={"skp": []})


def test_rtn_refuses_kv_cache_schemes(plugins):
    with pytest.raises(api.ConfigError, match="KV cache"):
        api.build_quantizer("rtn", get_scheme("W8A8KV8"), {}, plugins)
