import os

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
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
    api.save_model(result.model, tiny_tokenizer, target, {"run": "first"}, plugins=plugins)
    first = (target / "qcore.json").read_text()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("qcore_builtins.formats.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        api.save_model(result.model, tiny_tokenizer, target, {"run": "second"},
                       plugins=plugins)
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
