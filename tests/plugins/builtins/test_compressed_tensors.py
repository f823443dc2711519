"""The compressed-tensors export, checked by the compressed-tensors package itself and by
transformers' loader; the import of such checkpoints back into QuantLinear modules."""

import json

import pytest
import torch

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import ConfigError, SavedModelError
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear

ct = pytest.importorskip("compressed_tensors", reason="the compressed-tensors test extra")

SCHEMES = [("W4A16", 32, {}), ("W3A16", 32, {}), ("W8A16", None, {}), ("W8A8", None, {}),
           ("W4A4", None, {})]


def _quantize(folder, scheme, group_size=None, method="rtn", options=None, save=None,
              fmt="qcore"):
    data = DataSpec(source=str(folder / "calib.txt"))
    config = RunConfig(model=str(folder / "tiny"), method=method, scheme=scheme,
                       group_size=group_size, method_config=options or {},
                       calibration=CalibrationConfig(data=data, samples=2, seq_len=16,
                                                     batch_size=1),
                       save=str(save) if save else None, format=fmt)
    return api.quantize(config, progress=False)


def _quant_linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.mark.parametrize("scheme,group_size,options", SCHEMES)
def test_export_is_what_compressed_tensors_decompresses(tiny_folder, tmp_path, scheme,
                                                        group_size, options, one_thread):
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )
    from safetensors.torch import load_file

    result = _quantize(tiny_folder, scheme, group_size, options=options,
                       save=tmp_path / "q")
    saved = api.export_model(str(tmp_path / "q"), "compressed-tensors", tmp_path / "ct")
    summary = saved.metadata["export"]
    assert summary["ignore"] == ["lm_head"] and len(summary["layers"]) == 14

    # compressed-tensors' own dequantization gives qcore's weights bit for bit
    # (its converter works on tensor names alone: int-quantized keeps the name "weight",
    # so the float modules whose weights are not quantized are named as ignored)
    floats = ["re:.*embed_tokens$", "re:.*norm$", "lm_head"]
    convert_checkpoint(tmp_path / "ct", tmp_path / "deq",
                       CompressedTensorsDequantizer(tmp_path / "ct", ignore=floats,
                                                    dtype=torch.float32),
                       max_workers=1, device="cpu")
    dense = load_file(str(tmp_path / "deq" / "model.safetensors"))
    for name, module in _quant_linears(result.model).items():
        assert torch.equal(dense[f"{name}.weight"], module.dequantize()), name

    # qcore reads the export back: the same packed tensors, the same outputs
    model, _, meta = api.load_model(str(tmp_path / "ct"))
    assert meta["format"] == "compressed-tensors"
    before, after = _quant_linears(result.model), _quant_linears(model)
    assert before.keys() == after.keys()
    for name, m in before.items():
        for buf in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(m, buf), getattr(after[name], buf)), (name, buf)
        assert m.spec == after[name].spec
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_quantization_config_is_compressed_tensors_own(tiny_folder, tmp_path):
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
    )

    _quantize(tiny_folder, "W4A16", 32, save=tmp_path / "ct", fmt="compressed-tensors")
    mine = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    (theirs_dir / "config.json").write_text("{}")
    scheme = QuantizationScheme(
        targets=["Linear"], format="pack-quantized",
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                 group_size=32))
    config = QuantizationConfig(config_groups={"group_0": scheme}, ignore=["lm_head"],
                                format="pack-quantized", quantization_status="compressed")
    ModelCompressor(quantization_config=config).update_config(str(theirs_dir))
    theirs = json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    assert mine == theirs


@pytest.mark.parametrize("scheme,group_size", [("W4A16", 32), ("W8A8", None)])
def test_transformers_loads_the_export_with_qcores_outputs(tiny_folder, tmp_path, scheme,
                                                           group_size, one_thread):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    result = _quantize(tiny_folder, scheme, group_size, save=tmp_path / "ct",
                       fmt="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ct", quantization_config=CompressedTensorsConfig(dequantize=True),
        dtype=torch.float32)
    for name, module in _quant_linears(result.model).items():
        assert torch.equal(hf.get_submodule(name).weight, module.dequantize()), name
    if scheme == "W4A16":  # weight-only: the dequantized model is the quantized one
        ids = torch.arange(2, 34).reshape(2, 16)
        with torch.no_grad():
            torch.testing.assert_close(hf(input_ids=ids).logits,
                                       result.model(input_ids=ids).logits,
                                       rtol=1e-5, atol=1e-5)


def test_sharded_export_with_an_index(tiny_folder, tmp_path):
    _quantize(tiny_folder, "W4A16", 32, save=tmp_path / "q")
    api.export_model(str(tmp_path / "q"), "compressed-tensors", tmp_path / "ct",
                     max_shard_size="100KB")
    index = json.loads((tmp_path / "ct" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "ct" / s).is_file() for s in shards)
    model, _, _ = api.load_model(str(tmp_path / "ct"))
    reference, _, _ = api.load_model(str(tmp_path / "q"))
    ids = torch.arange(2, 18).reshape(1, 16)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    # a missing shard is named
    (tmp_path / "ct" / shards[-1]).unlink()
    with pytest.raises(SavedModelError, match=shards[-1]):
        api.load_model(str(tmp_path / "ct"))


#: GPTQ act-order without static groups (the default has them): a permuted g_idx
PERMUTED_GROUPS = {"act_order": True, "static_groups": False}


def test_what_the_format_cannot_hold_is_refused(tiny_folder, tmp_path):
    # act-order without static groups: a permuted g_idx (compressed-tensors 0.20 removed it)
    _quantize(tiny_folder, "W4A16", 32, method="gptq", options=PERMUTED_GROUPS,
              save=tmp_path / "ao")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\..*permuted groups"):
        api.export_model(str(tmp_path / "ao"), "compressed-tensors", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    # refused before any work: online transforms, a dynamic KV cache
    for method, scheme, fragment in (("flatquant", "W4A4", "online input transforms"),
                                     ("smoothquant", "W8A8KV8",
                                      "compressed-tensors stores static KV-cache scales")):
        with pytest.raises(ConfigError, match=fragment):
            _quantize(tiny_folder, scheme, method=method, save=tmp_path / "y",
                      fmt="compressed-tensors")
        assert not (tmp_path / "y").exists()
    # a float model has nothing to export
    with pytest.raises(ConfigError, match="not a quantized model"):
        api.export_model(str(tiny_folder / "tiny"), "compressed-tensors", tmp_path / "z")


def test_a_refusal_after_quantizing_keeps_the_work(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="saved in the qcore format at") as info:
        _quantize(tiny_folder, "W4A16", 32, method="gptq", options=PERMUTED_GROUPS,
                  save=tmp_path / "ct", fmt="compressed-tensors")
    rescue = tmp_path / "ct-qcore"
    assert str(rescue) in str(info.value) and (rescue / "qcore.json").is_file()
    assert not (tmp_path / "ct").exists()


def test_a_tensor_of_the_wrong_shape_is_named(tiny_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    _quantize(tiny_folder, "W4A16", 32, save=tmp_path / "ct", fmt="compressed-tensors")
    file = tmp_path / "ct" / "model.safetensors"
    tensors = load_file(str(file))
    name = "model.layers.1.mlp.down_proj.weight_scale"
    tensors[name] = tensors[name][:, :1].contiguous()
    save_file(tensors, str(file), metadata={"format": "pt"})
    with pytest.raises(SavedModelError, match=name):
        api.load_model(str(tmp_path / "ct"))


def _full_range_w8a8():
    from qcore.schemes import get_scheme

    scheme = get_scheme("W8A8")
    return scheme.model_copy(update={"activations": scheme.activations.model_copy(
        update={"symmetric_range": "full"})})


def test_compressed_tensors_activation_convention_is_reproduced(one_thread):
    """compressed-tensors maps max |x| to 127.5 (its own fake quantization, what
    transformers runs); qcore's default, like vLLM's int8 kernels, to 127."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    from qcore.quant.qparams import fake_quantize_activation

    x = torch.randn(6, 40) * torch.linspace(0.1, 20, 40)
    args = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token",
                            dynamic=True)
    scale, zp = calculate_qparams(x.amin(-1, keepdim=True), x.amax(-1, keepdim=True), args)
    theirs = fake_quantize(x, scale, zp, args)
    full = _full_range_w8a8().activations
    assert torch.equal(fake_quantize_activation(x, full), theirs)
    signed = full.model_copy(update={"symmetric_range": "signed"})
    assert not torch.equal(fake_quantize_activation(x, signed), theirs)


def test_the_activation_convention_survives_the_round_trip_and_picks_the_kernel(
        tiny_folder, tmp_path):
    from qcore_backends.cpu.backend import CPUBackend

    for scheme, expected in (("W8A8", "signed"), (_full_range_w8a8(), "full")):
        out = tmp_path / f"ct-{expected}"
        result = _quantize(tiny_folder, scheme, save=out, fmt="compressed-tensors")
        config = json.loads((out / "config.json").read_text())
        assert config["qcore"] == {"activation_symmetric_range": expected}
        back, _, _ = api.load_model(str(out))
        for name, module in _quant_linears(back).items():
            assert module.spec.activations.symmetric_range == expected, name
            # the int8 kernel's scale is max |x| / 127: not for the full convention
            assert (CPUBackend().kernel_for(module) is None) == (expected == "full")
        assert torch.equal(_quant_linears(back)["model.layers.0.mlp.down_proj"].qweight,
                           _quant_linears(result.model)["model.layers.0.mlp.down_proj"].qweight)
    # a checkpoint without qcore's note (llm-compressor's) is read with its own convention
    del config["qcore"]
    (out / "config.json").write_text(json.dumps(config))
    back, _, _ = api.load_model(str(out))
    assert {m.spec.activations.symmetric_range for m in _quant_linears(back).values()} == \
        {"full"}


def test_transformers_runs_a_full_range_w8a8_export_as_qcore_does(tiny_folder, tmp_path,
                                                                  one_thread):
    from transformers import AutoModelForCausalLM

    result = _quantize(tiny_folder, _full_range_w8a8(), save=tmp_path / "ct",
                       fmt="compressed-tensors")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits,
                                   result.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def _static_kv_scheme():
    """W8A8 with full-range activations (compressed-tensors' own fake quantization) and
    static per-tensor int8 KV scales."""
    from qcore.schemes import get_scheme

    return _full_range_w8a8().model_copy(
        update={"name": "W8A8C8-TENSOR", "kv_cache": get_scheme("W8A8C8-TENSOR").kv_cache})


def test_static_kv_scales_export_as_kv_cache_scheme(tiny_folder, tmp_path, one_thread):
    """W8A8C8-TENSOR: kv_cache_scheme as compressed-tensors writes it, k_scale/v_scale per
    attention module; transformers (compressed-tensors' hooked KV cache) runs the export
    as qcore runs its model; qcore reads it back bit for bit."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from qcore.quant.kvcache import kv_quantizers

    result = _quantize(tiny_folder, _static_kv_scheme(), method="smoothquant",
                       save=tmp_path / "ct", fmt="compressed-tensors")
    config = json.loads((tmp_path / "ct" / "config.json").read_text())["quantization_config"]
    theirs_dir = tmp_path / "theirs"
    theirs_dir.mkdir()
    (theirs_dir / "config.json").write_text("{}")
    kv = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor",
                          dynamic=False)
    ct_config = QuantizationConfig.model_validate({**config, "kv_cache_scheme": kv})
    ModelCompressor(quantization_config=ct_config).update_config(str(theirs_dir))
    theirs = json.loads((theirs_dir / "config.json").read_text())["quantization_config"]
    assert config["kv_cache_scheme"] == theirs["kv_cache_scheme"]

    stored = load_file(str(tmp_path / "ct" / "model.safetensors"))
    quantizers = kv_quantizers(result.model)
    assert len(quantizers) == 2
    for name, q in quantizers.items():
        assert torch.equal(stored[f"{name}.k_scale"], q.key_scale.reshape(1))
        assert torch.equal(stored[f"{name}.v_scale"], q.value_scale.reshape(1))
    assert not [k for k in stored if "qcore_kv" in k]

    # compressed-tensors' own fake quantization, with the exported kv_cache_scheme and
    # k_scale / v_scale, of the post-RoPE keys and values qcore's attention caches, gives
    # qcore's quantized keys and values bit for bit
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    ids = torch.arange(2, 34).reshape(2, 16)
    args = QuantizationArgs.model_validate(config["kv_cache_scheme"])
    for name, q in quantizers.items():
        seen = []
        hook = q.register_forward_hook(lambda m, a, o, seen=seen: seen.append((a, o)))
        with torch.no_grad():
            result.model(input_ids=ids)
        hook.remove()
        (_, key, value), (_, kq, vq) = seen[0]
        for x, xq, role in ((key, kq, "k"), (value, vq, "v")):
            scale = stored[f"{name}.{role}_scale"]
            theirs = fake_quantize(x, scale, torch.zeros_like(scale, dtype=torch.int8), args)
            assert torch.equal(theirs, xq), (name, role)
            assert not torch.equal(xq, x)
    # transformers 5.24 renamed attention's past_key_values argument, which compressed-
    # tensors 0.20 looks for to hook the KV cache: it loads k_scale/v_scale as unexpected
    # keys and runs a float cache; the rest of the export gives qcore's model without KV
    # quantization
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        ours = result.model(input_ids=ids).logits
        for q in quantizers.values():
            q.enabled = False
        torch.testing.assert_close(hf(input_ids=ids).logits, result.model(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
        for q in quantizers.values():
            q.enabled = True

    back, _, _ = api.load_model(str(tmp_path / "ct"))
    again = kv_quantizers(back)
    for name, q in quantizers.items():
        assert again[name].spec == q.spec
        assert torch.equal(again[name].key_scale, q.key_scale)
        assert torch.equal(again[name].value_scale, q.value_scale)
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ours)


def test_per_channel_kv_scales_are_refused_by_compressed_tensors(tiny_folder, tmp_path):
    with pytest.raises(ConfigError, match="static KV scales per channel.*W8A8C8-TENSOR"):
        _quantize(tiny_folder, "W8A8C8", method="smoothquant", save=tmp_path / "ct",
                  fmt="compressed-tensors")
    assert not (tmp_path / "ct").exists()
    # an asymmetric or per-token kv_cache_scheme in a checkpoint is named
    _quantize(tiny_folder, _static_kv_scheme(), method="smoothquant", save=tmp_path / "ok",
              fmt="compressed-tensors")
    file = tmp_path / "ok" / "config.json"
    config = json.loads(file.read_text())
    config["quantization_config"]["kv_cache_scheme"]["symmetric"] = False
    file.write_text(json.dumps(config))
    with pytest.raises(SavedModelError, match="kv_cache_scheme int8 asym tensor"):
        api.load_model(str(tmp_path / "ok"))
