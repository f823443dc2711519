"""Streaming a safetensors folder one decoder layer at a time (qcore.engine.streaming)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qcore.engine.loading import load_float_model
from qcore.engine.streaming import StreamedCheckpoint, can_stream, resolve_dtype
from qcore.errors import ConfigError, NonFiniteError


def _folder(tmp_path, tiny_tokenizer, kind="llama", shard=None, dtype=torch.float32, **kw):
    from conftest import make_tiny_model

    model = make_tiny_model(kind, **kw).to(dtype)
    folder = tmp_path / f"{kind}-{'sharded' if shard else 'single'}"
    model.save_pretrained(folder, max_shard_size=shard) if shard else model.save_pretrained(
        folder)
    tiny_tokenizer.save_pretrained(folder)
    return folder


def _streamed(folder, dtype=torch.float32):
    ckpt = StreamedCheckpoint(folder, dtype)
    ckpt.check()
    layers = ckpt.model.model.layers
    ckpt.load_outside(list(layers))
    return ckpt, layers


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("shard", [None, "100KB"])
def test_streamed_layers_compute_what_the_loaded_model_does(tmp_path, tiny_tokenizer, kind,
                                                            shard):
    folder = _folder(tmp_path, tiny_tokenizer, kind, shard)
    assert can_stream(folder)
    assert (folder / "model.safetensors.index.json").is_file() == bool(shard)
    ckpt, layers = _streamed(folder)
    assert all(p.device.type == "meta" for p in layers.parameters())
    assert ckpt.model.model.embed_tokens.weight.device.type == "cpu"
    for i, layer in enumerate(layers):
        ckpt.load_layer(f"model.layers.{i}.", layer)
    reference, _ = load_float_model(str(folder))
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ckpt.model(ids).logits, reference(ids).logits)


def test_tied_head_comes_from_the_embedding(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, tiny_tokenizer, tie_word_embeddings=True)
    ckpt, _ = _streamed(folder)
    model = ckpt.model
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_dtype_auto_is_the_checkpoints_and_other_dtypes_convert(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, tiny_tokenizer, dtype=torch.bfloat16)
    assert resolve_dtype("auto", folder) == torch.bfloat16
    assert resolve_dtype("float16", folder) == torch.float16
    assert resolve_dtype("auto", None) == torch.float32
    bf16, _ = _streamed(folder, torch.bfloat16)
    assert bf16.model.model.embed_tokens.weight.dtype == torch.bfloat16
    f32, layers = _streamed(folder, torch.float32)
    f32.load_layer("model.layers.0.", layers[0])
    assert layers[0].mlp.up_proj.weight.dtype == torch.float32
    assert torch.equal(layers[0].mlp.up_proj.weight,
                       load_file(folder / "model.safetensors")[
                           "model.layers.0.mlp.up_proj.weight"].float())


def test_a_missing_index_entry_is_named_before_any_work(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, tiny_tokenizer, shard="100KB")
    index = folder / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    del data["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    index.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight is "
                                          r"missing \(not in model\.safetensors\.index\.json"):
        StreamedCheckpoint(folder).check()


def test_a_missing_shard_is_named(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, tiny_tokenizer, shard="100KB")
    weight_map = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.layers.1.mlp.down_proj.weight"]
    (folder / shard).unlink()
    with pytest.raises(ConfigError, match=rf"shard {shard} \(holding model\.layers\.1\."):
        StreamedCheckpoint(folder)


def test_a_tensor_of_the_wrong_shape_is_named(tmp_path, tiny_tokenizer):
    folder = _folder(tmp_path, tiny_tokenizer)
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 64)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt, layers = _streamed(folder)
    with pytest.raises(ConfigError, match=r"q_proj\.weight is \[3, 64\], the model's config "
                                          r"needs \[64, 64\]"):
        ckpt.load_layer("model.layers.0.", layers[0])


@pytest.mark.parametrize("name", ["model.layers.1.mlp.gate_proj.weight",
                                  "model.embed_tokens.weight"])
def test_non_finite_source_weights_are_named(tmp_path, tiny_tokenizer, name):
    folder = _folder(tmp_path, tiny_tokenizer)
    state = load_file(folder / "model.safetensors")
    state[name][3, 5] = float("nan")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    ckpt = StreamedCheckpoint(folder)
    layers = ckpt.model.model.layers
    with pytest.raises(NonFiniteError, match=rf"source weight {name} holds 1 NaN"):
        ckpt.load_outside(list(layers))
        for i, layer in enumerate(layers):
            ckpt.load_layer(f"model.layers.{i}.", layer)


class _PagingSpy:
    """Wraps a backend's release_host_memory to count the bytes it is handed."""

    def __init__(self, monkeypatch):
        from qcore_backends.cpu.backend import CPUBackend

        self.calls = []
        original = CPUBackend.release_host_memory
        monkeypatch.setattr(CPUBackend, "release_host_memory",
                            lambda be, ranges: (self.calls.append(ranges),
                                                original(be, ranges))[1])


def test_a_float32_folder_evaluates_the_same_with_its_layers_paged(
        tmp_path, tiny_tokenizer, plugins, monkeypatch):
    from qcore import api
    from qcore.engine.streaming import mapped_bytes
    from qcore.interfaces import DataSpec

    folder = _folder(tmp_path, tiny_tokenizer, "qwen2", "100KB")
    (tmp_path / "t.txt").write_text("Some evaluation prose about code. " * 200)
    options = {"data": DataSpec(source=str(tmp_path / "t.txt")), "seq_len": 16, "windows": 6,
               "batch_size": 2}
    model, tok, _ = api.load_model(str(folder), plugins)  # float32 folder: mapped as loaded
    assert mapped_bytes(model.model.layers) == sum(
        p.numel() * 4 for p in model.model.layers.parameters())
    whole = api.evaluate(model, tok, "perplexity", options, plugins=plugins, page_layers=False)
    spy = _PagingSpy(monkeypatch)
    paged = api.evaluate(model, tok, "perplexity", options, plugins=plugins, page_layers=True)
    assert paged.metrics == whole.metrics
    # paged out: the embedding and the 2 layers after each of the 3 batches, the head after
    # each of its 6 calls (one chunk of positions per window)
    assert len(spy.calls) == 3 * (1 + 2) + 6 and all(spy.calls)


def test_a_saved_quantized_model_evaluates_the_same_with_its_layers_paged(
        tmp_path, tiny_tokenizer, plugins, monkeypatch):
    from conftest import make_tiny_model

    from qcore import api
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec

    model = make_tiny_model("llama")
    (tmp_path / "t.txt").write_text("Some evaluation prose about code. " * 200)
    data = DataSpec(source=str(tmp_path / "t.txt"))
    config = RunConfig(model="tiny", method="rtn", scheme="W4A16", group_size=32,
                       calibration=CalibrationConfig(data=data, samples=2, seq_len=16),
                       save=str(tmp_path / "q"))
    api.quantize(config, model=model, tokenizer=tiny_tokenizer, plugins=plugins,
                 progress=False)
    options = {"data": data, "seq_len": 16, "windows": 4, "batch_size": 2}
    saved, tok, _ = api.load_model(str(tmp_path / "q"), plugins)
    plain = api.evaluate(saved, tok, "perplexity", options, plugins=plugins, page_layers=False)
    spy = _PagingSpy(monkeypatch)
    paged = api.evaluate(saved, tok, "perplexity", options, plugins=plugins, page_layers=True)
    assert paged.metrics == plain.metrics and len(spy.calls) == 2 * (1 + 2) + 4
