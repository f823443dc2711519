import json
import os
import re

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import SavedModelError
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear


def _quantized(model, tokenizer, plugins, scheme="W4A16", group=32, save=None):
    cfg = RunConfig(model="tiny", method="rtn", scheme=scheme, group_size=group,
                    calibration=CalibrationConfig(data=DataSpec(source="pydoc"), samples=4,
                                                  seq_len=32), save=save)
    return api.quantize(cfg, model=model, tokenizer=tokenizer, plugins=plugins, progress=False)


@pytest.mark.parametrize("scheme, group", [("W4A16", 32), ("W3A16", 16), ("W8A8", None)])
def test_save_load_round_trip_is_bit_exact(tiny_model, tiny_tokenizer, plugins, tmp_path,
                                           scheme, group):
    result = _quantized(tiny_model, tiny_tokenizer, plugins, scheme, group,
                        save=str(tmp_path / "q"))
    ids = torch.randint(0, 512, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = result.model(ids).logits
        model, tokenizer, meta = api.load_model(str(tmp_path / "q"), plugins)
        after = model(ids).logits
    assert torch.equal(before, after)
    assert meta["run"]["method"] == "rtn" and meta["scheme"]["name"] == scheme
    assert meta["versions"]["torch"] == torch.__version__
    assert len(meta["quantized_layers"]) == 2 * 7
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantLinear)
    assert tokenizer is not None and tokenizer("hello").input_ids == tiny_tokenizer(
        "hello").input_ids


def test_interrupted_save_leaves_nothing_behind(tiny_llama, tiny_tokenizer, plugins, tmp_path,
                                                monkeypatch):
    result = _quantized(tiny_llama, tiny_tokenizer, plugins)
    target = tmp_path / "out"
    api.save_model(result.model, tiny_tokenizer, target, {"run": {"note": "first"}},
                   plugins=plugins)
    first = (target / "qcore.json").read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qcore_builtins.qcore_writer.write_tensor", explode)
    with pytest.raises(OSError, match="disk full"):
        api.save_model(result.model, tiny_tokenizer, target, {"run": {"note": "second"}},
                       plugins=plugins, overwrite=True)
    assert (target / "qcore.json").read_text() == first  # old output intact
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no half-written temporary folder
    with pytest.raises(OSError):
        api.save_model(result.model, tiny_tokenizer, tmp_path / "new", {}, plugins=plugins)
    assert not (tmp_path / "new").exists()


def test_tied_embeddings_survive_the_round_trip(tiny_tokenizer, plugins, tmp_path):
    from conftest import make_tiny_model

    model = make_tiny_model("llama", tie_word_embeddings=True)
    result = _quantized(model, tiny_tokenizer, plugins, save=str(tmp_path / "t"))
    loaded, _, _ = api.load_model(str(tmp_path / "t"), plugins)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.equal(result.model(ids).logits, loaded(ids).logits)


# ----------------------------------------------------------------------------- verification
@pytest.fixture
def saved(tiny_llama, tiny_tokenizer, plugins, tmp_path):
    _quantized(tiny_llama, tiny_tokenizer, plugins, save=str(tmp_path / "q"))
    return tmp_path / "q"


def _edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_metadata(folder, edit):
    meta = json.loads((folder / "qcore.json").read_text())
    edit(meta)
    (folder / "qcore.json").write_text(json.dumps(meta))


SCALES = "model.layers.1.mlp.down_proj.scales"


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.pop(SCALES), f"tensor {SCALES} is missing"),
    (lambda s: s.__setitem__("model.extra", torch.zeros(2)), "tensor model.extra is not in"),
    (lambda s: s.__setitem__(SCALES, s[SCALES].reshape(-1)), f"tensor {SCALES} is float32 "),
    (lambda s: s.__setitem__(SCALES, s[SCALES].double()), "the manifest says float32"),
    (lambda s: s[SCALES].mul_(1.5), f"tensor {SCALES} was altered"),
], ids=["missing", "extra", "reshaped", "retyped", "altered"])
def test_a_tampered_tensor_is_named_at_load(saved, plugins, edit, message):
    _edit_tensors(saved, edit)
    with pytest.raises(SavedModelError, match=re.escape(message)):
        api.load_model(str(saved), plugins)


def test_a_folder_with_quantized_tensors_but_no_metadata_is_refused(saved, plugins):
    (saved / "qcore.json").unlink()
    with pytest.raises(SavedModelError, match="no qcore.json"):
        api.load_model(str(saved), plugins)
    # also for folders saved before the header key existed: recognised by QuantLinear names
    _edit_tensors(saved, lambda s: None)
    with pytest.raises(SavedModelError, match=r"quantized tensors \(model\.layers\.0\."):
        api.load_model(str(saved), plugins)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("format_version", "2"), "format_version: Input should be a valid "
                                                     "integer (got '2')"),
    (lambda m: m.__setitem__("format_version", 99), "saved by a newer qcore"),
    (lambda m: m.__setitem__("colour", "red"), "colour: unknown field"),
    (lambda m: m.__setitem__("dtype", "float8"), "dtype: Input should be"),
    (lambda m: m.pop("quantized_layers"), "quantized_layers: Field required"),
], ids=["version-string", "version-newer", "unknown-field", "bad-dtype", "missing-field"])
def test_malformed_metadata_is_a_one_line_error(saved, plugins, edit, message):
    _edit_metadata(saved, edit)
    with pytest.raises(SavedModelError, match=re.escape(message)) as err:
        api.load_model(str(saved), plugins)
    assert "\n" not in str(err.value)


def test_metadata_that_is_not_json_names_the_line(saved, plugins):
    (saved / "qcore.json").write_text('{\n  "format": "qcore",\n  oops\n}')
    with pytest.raises(SavedModelError, match="qcore.json line 3 column 3: not valid JSON"):
        api.load_model(str(saved), plugins)


def test_version_1_folders_without_a_manifest_still_load(saved, plugins, caplog):
    _edit_metadata(saved, lambda m: (m.pop("tensors"), m.__setitem__("format_version", 1)))
    model, _, meta = api.load_model(str(saved), plugins)
    assert meta["format_version"] == 1 and "not verified" in caplog.text


def test_manifest_lists_every_tensor_with_its_digest(saved):
    from safetensors.torch import load_file

    from qcore_builtins.formats import tensor_digest

    meta = json.loads((saved / "qcore.json").read_text())
    state = load_file(str(saved / "model.safetensors"))
    assert set(meta["tensors"]) == set(state)
    for name, t in state.items():
        assert meta["tensors"][name] == {"shape": list(t.shape),
                                         "dtype": str(t.dtype).removeprefix("torch."),
                                         "sha256": tensor_digest(t)}



def test_the_digest_read_in_chunks_is_the_sha256_of_the_whole_tensor(monkeypatch):
    import hashlib

    from qcore_builtins import qcore_writer

    t = torch.randn(1000, 7).to(torch.bfloat16)
    whole = hashlib.sha256(t.view(torch.uint8).numpy().tobytes()).hexdigest()
    monkeypatch.setattr(qcore_writer, "DIGEST_CHUNK", 999)  # 15 chunks, the last partial
    chunks = []
    assert qcore_writer.tensor_digest(t, after_chunk=chunks.append) == whole
    assert len(chunks) == 15 and sum(c.numel() for c in chunks) == 14000


@pytest.mark.parametrize("stream", [True, False])
def test_static_kv_scales_round_trip(tiny_folder, tiny_tokenizer, plugins, tmp_path, stream):
    """W8A8C8's calibrated KV scales are saved with the model (streamed layer by layer or
    whole) and reloaded bit for bit; qcore.json records the spec with its scale shape."""
    from transformers import AutoModelForCausalLM

    from qcore.quant.kvcache import kv_quantizers

    cfg = RunConfig(model=str(tiny_folder / "tiny"), method="smoothquant", scheme="W8A8C8",
                    calibration=CalibrationConfig(data=DataSpec(source=str(
                        tiny_folder / "calib.txt")), samples=2, seq_len=16, batch_size=1),
                    save=str(tmp_path / "q"))
    model = None if stream else AutoModelForCausalLM.from_pretrained(tiny_folder / "tiny")
    result = api.quantize(cfg, model=model, tokenizer=None if stream else tiny_tokenizer,
                          plugins=plugins, progress=False)
    ids = torch.arange(2, 34).reshape(2, 16)
    back, _, meta = api.load_model(str(tmp_path / "q"), plugins)
    assert set(meta["kv_cache"]) == {f"model.layers.{i}.self_attn" for i in range(2)}
    assert meta["kv_cache"]["model.layers.0.self_attn"]["scale_shape"] == [2, 16]
    saved, loaded = kv_quantizers(result.model), kv_quantizers(back)
    for name, q in saved.items():
        assert not torch.isnan(q.key_scale).any()
        assert torch.equal(loaded[name].key_scale, q.key_scale)
        assert torch.equal(loaded[name].value_scale, q.value_scale)
    with torch.no_grad():
        assert torch.equal(back(ids).logits, result.model(ids).logits)
