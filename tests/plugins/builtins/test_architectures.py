"""Architecture adapters: roles, and a new architecture (Qwen3) that works with every
method through its adapter alone."""

import pytest
import torch
from conftest import make_tiny_model
from torch import nn

from qcore import api, hookimpl
from qcore.config import CalibrationConfig, RunConfig
from qcore.interfaces import DataSpec
from qcore.models.adapter import ROLE_NAMES, ArchitectureAdapter
from qcore.plugins import PluginManager
from qcore.quant.linear import QuantLinear


def _config(method, scheme, **options):
    return RunConfig(model="tiny", method=method, scheme=scheme, group_size=16,
                     method_config=options,
                     calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                   seq_len=32, batch_size=2))


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_roles_name_real_submodules(kind, plugins):
    model = make_tiny_model(kind)
    adapter = api.adapter_for(model, plugins)
    assert adapter.name == kind
    roles = adapter.roles()
    layer = adapter.decoder_layers()[0]
    for role in ROLE_NAMES:
        name = getattr(roles, role)
        if name is not None:
            assert isinstance(layer.get_submodule(name), nn.Module), role
    assert roles.info.num_kv_heads == 2 and roles.info.head_dim == 16
    for group in roles.shared_inputs:
        assert all(n in adapter.linear_names() for n in group)
    assert (roles.q_norm is not None) == (kind == "qwen3")
    if kind == "qwen3":
        assert isinstance(layer.get_submodule(roles.k_norm), nn.Module)


@pytest.mark.parametrize("method, scheme, options, bound", [
    ("rtn", "W4A16", {}, 0.05),
    ("gptq", "W4A16", {}, 0.05),
    ("awq", "W4A16", {"n_grid": 4}, 0.05),
    ("smoothquant", "W8A8KV8", {}, 0.01),
    ("flatquant", "W4A4KV4", {"epochs": 1}, 0.5),
])
def test_qwen3_works_with_every_method(method, scheme, options, bound, tiny_tokenizer,
                                       plugins, tmp_path, one_thread):
    model = make_tiny_model("qwen3")
    config = _config(method, scheme, **options).model_copy(update={"save": str(tmp_path / "q")})
    result = api.quantize(config, model=model, tokenizer=tiny_tokenizer, plugins=plugins,
                          progress=False)
    errors = [x.relative_mse for x in result.report.layers]
    assert all(0 < e < bound for e in errors), errors
    assert isinstance(result.model.model.layers[1].self_attn.q_proj, QuantLinear)
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    loaded, _, _ = api.load_model(str(tmp_path / "q"), plugins)
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, loaded(ids).logits)


class _Bare(ArchitectureAdapter):
    """A third party's adapter that names its layers and linears but no roles."""

    name = "bare"
    model_types = ("bare-llama",)

    def decoder_layers(self):
        return self.model.model.layers

    def layer_prefix(self, index):
        return f"model.layers.{index}"

    def sequential_groups(self):
        return [["self_attn.q_proj"], ["mlp.down_proj"]]


class _BarePlugin:
    @hookimpl
    def qcore_register_architectures(self, register):
        register(_Bare)


def test_a_method_needing_a_role_the_adapter_lacks_is_refused_up_front(tiny_tokenizer):
    plugins = PluginManager(extra_plugins=[("bare", _BarePlugin())])
    model = make_tiny_model("llama")
    model.config.model_type = "bare-llama"
    with pytest.raises(api.ConfigError, match=r"flatquant needs the decoder-layer role\(s\) "
                                              r"attention, q, k, v, o, .* 'bare' architecture"):
        api.quantize(_config("flatquant", "W4A4"), model=model, tokenizer=tiny_tokenizer,
                     plugins=plugins, progress=False)
    # RTN reads no role: the same adapter serves it
    result = api.quantize(_config("rtn", "W4A16"), model=model, tokenizer=tiny_tokenizer,
                          plugins=plugins, progress=False)
    assert [x.name for x in result.report.layers] == ["model.layers.0", "model.layers.1"]
