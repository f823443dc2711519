import logging

import pytest
from torch import nn

from qcore.api import adapter_for
from qcore.models.adapter import LlamaLikeAdapter


def test_llama_and_qwen2_adapters(tiny_model, plugins):
    adapter = adapter_for(tiny_model, plugins)
    assert adapter.name == tiny_model.config.model_type
    assert len(adapter.decoder_layers()) == 2
    assert adapter.layer_prefix(1) == "model.layers.1"
    assert adapter.sequential_groups() == [
        ["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"],
        ["mlp.up_proj", "mlp.gate_proj"], ["mlp.down_proj"]]
    info = adapter.attention_info()
    assert (info.num_heads, info.num_kv_heads, info.head_dim) == (4, 2, 16) and info.grouped
    groups = adapter.smooth_groups(adapter.decoder_layers()[0])
    # grouped-query attention: v_proj (32 x 64) cannot fold into o_proj (64 x 64)
    assert [g.prev for g in groups] == ["input_layernorm", "post_attention_layernorm",
                                        "mlp.up_proj"]
    assert groups[0].linears == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    assert groups[0].block == "self_attn" and groups[1].block == "mlp"


def test_v_to_o_group_without_gqa(plugins):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", num_key_value_heads=4)
    groups = adapter_for(model, plugins).smooth_groups(model.model.layers[0])
    assert ("self_attn.v_proj", ("self_attn.o_proj",)) in [(g.prev, g.linears) for g in groups]


def test_generic_fallback_logs_its_assumptions(tiny_llama, plugins, caplog):
    tiny_llama.config.model_type = "my-llama-clone"
    with caplog.at_level(logging.WARNING):
        adapter = adapter_for(tiny_llama, plugins)
    assert isinstance(adapter, LlamaLikeAdapter) and adapter.name == "llama-like"
    assert "my-llama-clone" in caplog.text and "assuming the Llama layout" in caplog.text


def test_fallback_refuses_a_model_without_the_layout(tiny_llama):
    tiny_llama.model.layers = nn.ModuleList()
    with pytest.raises(ValueError, match="no decoder layers"):
        LlamaLikeAdapter(tiny_llama)
