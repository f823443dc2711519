"""The ascendV1 export (msModelSlim's layout for vllm-ascend), read back by a reader written
here from the documented semantics, by the NPU backend's argument mapping, and by qcore."""

import json
import sys

import pytest
import torch
from conftest import fake_torch_npu
from safetensors.torch import load_file

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import ConfigError, SavedModelError
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs, QuantScheme

W4_CHANNEL = QuantScheme(name="W4A16-channel", weights=QuantArgs(bits=4, symmetric=True))
CASES = [  # (label, method, scheme, group size, options, ascendV1 type)
    ("W8A16", "rtn", "W8A16", None, {}, "W8A16"),
    ("W4A16 g32", "rtn", "W4A16", 32, {}, "W4A16"),
    ("W4A16 channel", "rtn", W4_CHANNEL, None, {}, "W4A16"),
    ("W8A8 dynamic", "smoothquant", "W8A8", None, {}, "W8A8_DYNAMIC"),
    ("W8A8 static", "smoothquant", "W8A8", None, {"activation_mode": "static"}, "W8A8"),
]


def _quantize(folder, method, scheme, group_size=None, options=None, save=None,
              fmt="qcore"):
    config = RunConfig(model=str(folder / "tiny"), method=method, scheme=scheme,
                       group_size=group_size, method_config=options or {},
                       calibration=CalibrationConfig(
                           data=DataSpec(source=str(folder / "calib.txt")), samples=2,
                           seq_len=16, batch_size=1),
                       save=str(save) if save else None, format=fmt)
    return api.quantize(config, progress=False)


def _read(folder):
    """Every tensor of an ascendV1 folder, through its index, and its description."""
    index = json.loads((folder / "quant_model_weights.safetensors.index.json").read_text())
    tensors = {}
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(folder / shard)))
    assert set(tensors) == set(index["weight_map"])
    return tensors, json.loads((folder / "quant_model_description.json").read_text())


def _signed_weight(tensors, name, kind, grouped):
    """int4 pairs: per group (N/2, K) rows 2i/2i+1, per channel (N, K/2) columns 2j/2j+1;
    the low nibble first; values two's complement."""
    w = tensors[f"{name}.weight"].to(torch.int16)
    if kind != "W4A16":
        return w
    u = w & 0xFF
    low, high = u & 0xF, u >> 4
    if grouped:
        values = torch.stack((low, high), dim=1).reshape(-1, w.shape[1])
    else:
        values = torch.stack((low, high), dim=2).reshape(w.shape[0], -1)
    return torch.where(values >= 8, values - 16, values)


@pytest.mark.parametrize("label,method,scheme,group_size,options,kind", CASES,
                         ids=[c[0] for c in CASES])
def test_export_dequantizes_to_qcores_weights(tiny_folder, tmp_path, monkeypatch, label,
                                              method, scheme, group_size, options, kind):
    result = _quantize(tiny_folder, method, scheme, group_size, options, tmp_path / "asc",
                       "ascendv1")
    tensors, description = _read(tmp_path / "asc")
    assert description["version"] == "1.0.0" and description["model_quant_type"] == kind
    assert description["group_size"] == (group_size or 0)
    keys = {"version", "model_quant_type", "group_size", "metadata", "optional"}
    assert set(description) - keys == set(tensors)
    assert description["model.embed_tokens.weight"] == "FLOAT"
    assert description["lm_head.weight"] == "FLOAT"

    monkeypatch.setitem(sys.modules, "torch_npu", fake_torch_npu())
    from qcore_backends.npu.kernels import prepare_weight

    for name, m in result.model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        assert description[f"{name}.weight"] == kind
        signed = _signed_weight(tensors, name, kind, grouped=group_size is not None)
        if kind == "W8A8":  # weight scale folded into deq_scale (float32 bits in int64)
            deq = tensors[f"{name}.deq_scale"].to(torch.int32).view(torch.float32)
            assert torch.equal(deq, tensors[f"{name}.input_scale"] * m.scales[:, 0])
            assert tensors[f"{name}.quant_bias"].dtype == torch.int32
            assert torch.equal(signed + 128, m.codes().to(torch.int16))
            continue
        scale, offset = tensors[f"{name}.weight_scale"], tensors[f"{name}.weight_offset"]
        assert scale.dtype == offset.dtype == torch.float32
        groups = scale.shape[1]
        idx = torch.arange(m.in_features) // (m.in_features // groups)
        dense = (signed.float() - offset[:, idx]) * scale[:, idx]
        assert torch.equal(dense, m.dequantize()), name
        # the NPU kernel arguments from the export equal those from the qcore model
        p = prepare_weight(m)
        npu_weight = signed.t().contiguous()
        if kind == "W4A16":
            npu_weight = sys.modules["torch_npu"].npu_convert_weight_to_int4pack(
                npu_weight.to(torch.int32))
        assert torch.equal(p.weight.to(torch.int32), npu_weight.to(torch.int32)), name
        npu_scale = scale.t().contiguous() if groups > 1 else scale[:, 0]
        npu_offset = -(offset.t().contiguous() if groups > 1 else offset[:, 0])
        assert torch.equal(p.scale, npu_scale)
        assert (p.offset is None and not torch.any(npu_offset != 0)) or torch.equal(
            p.offset, npu_offset)


@pytest.mark.parametrize("label,method,scheme,group_size,options,kind", CASES[:4],
                         ids=[c[0] for c in CASES[:4]])
def test_round_trip_through_ascendv1_is_bit_identical(tiny_folder, tmp_path, label, method,
                                                      scheme, group_size, options, kind):
    result = _quantize(tiny_folder, method, scheme, group_size, options, tmp_path / "q")
    api.export_model(str(tmp_path / "q"), "ascendv1", tmp_path / "asc")
    model, _, meta = api.load_model(str(tmp_path / "asc"))
    assert meta["format"] == "ascendv1" and meta["description"]["model_quant_type"] == kind
    for name, m in result.model.named_modules():
        if isinstance(m, QuantLinear):
            back = model.get_submodule(name)
            for buf in ("qweight", "scales", "zeros", "g_idx"):
                assert torch.equal(getattr(m, buf), getattr(back, buf)), (name, buf)
            assert m.spec.weights == back.spec.weights
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_static_w8a8_reads_back_within_a_float32_rounding(tiny_folder, tmp_path):
    result = _quantize(tiny_folder, "smoothquant", "W8A8", None,
                       {"activation_mode": "static"}, tmp_path / "asc", "ascendv1")
    model, _, _ = api.load_model(str(tmp_path / "asc"))
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits,
                                   result.model(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_what_ascendv1_cannot_hold_is_refused(tiny_folder, tmp_path):
    symmetric = "W4A4_FLATQUANT_DYNAMIC quantizes activations per token symmetrically.*ascend=true"
    dynamic_kv = "C8 stores static KV scales.*W8A8C8"
    for method, scheme, fragment in (("flatquant", "W4A4", symmetric),
                                     ("smoothquant", "W8A8KV8", dynamic_kv)):
        with pytest.raises(ConfigError, match=fragment):
            _quantize(tiny_folder, method, scheme, save=tmp_path / "x", fmt="ascendv1")
    _quantize(tiny_folder, "rtn", "W4A4", save=tmp_path / "w4a4")
    with pytest.raises(ConfigError, match=r"model\.layers\.0\..*int4 sym channel weights "
                                          r"with activations"):
        api.export_model(str(tmp_path / "w4a4"), "ascendv1", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_full_range_activations_are_refused_for_w8a8_dynamic(tiny_folder, tmp_path):
    from qcore.schemes import get_scheme

    scheme = get_scheme("W8A8")
    scheme = scheme.model_copy(update={"activations": scheme.activations.model_copy(
        update={"symmetric_range": "full"})})
    _quantize(tiny_folder, "rtn", scheme, save=tmp_path / "full")
    with pytest.raises(ConfigError, match=r"max \|x\| / 127\.5 .*npu_dynamic_quant divides "
                                          r"by 127"):
        api.export_model(str(tmp_path / "full"), "ascendv1", tmp_path / "y")


def _vllm_ascend_flatquant(x, tensors, name):
    """vllm-ascend's W4A4_FLATQUANT_DYNAMIC forward, written from its source and
    npu_kronecker_quant's documentation: x (-1, n1, n2) -> left^T X right, int4 codes per
    token with scale clip_ratio * max|x| / 7, integer matmul with the int4 weight, times the
    token's and the weight row's scales, plus the bias."""
    left, right = tensors[f"{name}.left_trans"], tensors[f"{name}.right_trans"]
    n1, n2 = left.shape[0], right.shape[0]
    xt = (left.t() @ (x.reshape(-1, n1, n2) @ right)).reshape(x.shape[0], -1)
    token_scale = tensors[f"{name}.clip_ratio"] * xt.abs().amax(dim=-1, keepdim=True) / 7
    xq = torch.clamp(torch.round(xt / token_scale), -8, 7)
    w = tensors[f"{name}.weight"].double()
    y = (xq.double() @ w.t()) * token_scale.double() * tensors[f"{name}.weight_scale"].double().t()
    if f"{name}.bias" in tensors:
        y = y + tensors[f"{name}.bias"].double()
    return y


def test_flatquant_ascend_exports_what_vllm_ascend_computes(tiny_folder, tmp_path):
    result = _quantize(tiny_folder, "flatquant", "W4A4", None, {"ascend": True, "epochs": 1},
                       tmp_path / "asc", "ascendv1")
    tensors, description = _read(tmp_path / "asc")
    assert description["model_quant_type"] == "W4A4_FLATQUANT_DYNAMIC"
    keys = {"version", "model_quant_type", "group_size", "metadata", "optional"}
    assert set(description) - keys == set(tensors)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for name, m in result.model.named_modules():
        if not isinstance(m, QuantLinear):
            continue
        for suffix in ("weight", "weight_scale", "weight_offset", "left_trans", "right_trans",
                       "clip_ratio"):
            assert description[f"{name}.{suffix}"] == "W4A4_FLATQUANT_DYNAMIC", (name, suffix)
        w = tensors[f"{name}.weight"]
        assert w.dtype == torch.int8 and tuple(w.shape) == (m.out_features, m.in_features)
        assert int(w.min()) >= -8 and int(w.max()) <= 7
        assert not torch.any(tensors[f"{name}.weight_offset"] != 0)
        # the stored weight dequantizes to qcore's
        assert torch.equal(w.float() * tensors[f"{name}.weight_scale"], m.dequantize())
        x = torch.randn(6, m.in_features, generator=gen)
        with torch.no_grad():
            torch.testing.assert_close(_vllm_ascend_flatquant(x, tensors, name),
                                       m(x).double(), rtol=1e-4, atol=1e-5)
        checked += 1
    assert checked == 7 * len(result.model.model.layers)
    layer0 = "model.layers.0.self_attn"
    for fused in ("k_proj", "v_proj"):  # vllm-ascend's qkv layer keeps one of each
        for suffix in ("left_trans", "right_trans", "clip_ratio"):
            assert torch.equal(tensors[f"{layer0}.{fused}.{suffix}"],
                               tensors[f"{layer0}.q_proj.{suffix}"])
    assert torch.equal(tensors[f"{layer0}.o_proj.left_trans"],
                       torch.eye(tensors[f"{layer0}.o_proj.left_trans"].shape[0]))


def test_flatquant_ascend_round_trip_is_bit_identical(tiny_folder, tmp_path):
    result = _quantize(tiny_folder, "flatquant", "W4A4", None, {"ascend": True, "epochs": 1},
                       tmp_path / "q")
    api.export_model(str(tmp_path / "q"), "ascendv1", tmp_path / "asc")
    model, _, meta = api.load_model(str(tmp_path / "asc"))
    assert meta["description"]["model_quant_type"] == "W4A4_FLATQUANT_DYNAMIC"
    for name, m in result.model.named_modules():
        if isinstance(m, QuantLinear):
            back = model.get_submodule(name)
            assert back.spec == m.spec, name
            for buf in ("qweight", "scales", "zeros"):
                assert torch.equal(getattr(m, buf), getattr(back, buf)), (name, buf)
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(result.model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_fused_linears_with_different_transforms_are_refused(tiny_folder, tmp_path):
    result = _quantize(tiny_folder, "flatquant", "W4A4", None, {"ascend": True, "epochs": 1})
    k_proj = result.model.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        k_proj.input_transform.left.mul_(1.01)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj: its transform "
                                         r"or activation clip ratio differs.*q_proj/k_proj/v_proj"):
        api.save_model(result.model, None, tmp_path / "asc", {}, format="ascendv1")
    assert not (tmp_path / "asc").exists()


@pytest.mark.parametrize("scheme,kind", [("W8A8C8", "qwen2"), ("W8A8C8-TENSOR", "llama")])
def test_static_kv_cache_exports_as_c8(tiny_folder, tmp_path, scheme, kind):
    """C8: k_proj/v_proj.kv_cache_scale float32 [kv_heads * head_dim] (head-major) with zero
    offsets, kv_cache_type / kv_quant_type "C8"; read back, qcore's outputs are unchanged
    (a per-tensor scale is written per channel: the same value in every channel). Llama:
    an attention without biases, whose read-back QuantLinears hold buffers only."""
    from conftest import make_tiny_model

    from qcore.quant.kvcache import kv_quantizers

    if kind == "llama":
        make_tiny_model("llama").save_pretrained(tiny_folder / "tiny")

    result = _quantize(tiny_folder, "smoothquant", scheme, save=tmp_path / "asc",
                       fmt="ascendv1")
    tensors, description = _read(tmp_path / "asc")
    assert description["kv_cache_type"] == description["kv_quant_type"] == "C8"
    assert description["model_quant_type"] == "W8A8_DYNAMIC"
    config = result.model.config
    width = config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    quantizers = kv_quantizers(result.model)
    assert len(quantizers) == 2
    for name, q in quantizers.items():
        for role, linear in (("key", "k_proj"), ("value", "v_proj")):
            scale = tensors[f"{name}.{linear}.kv_cache_scale"]
            offset = tensors[f"{name}.{linear}.kv_cache_offset"]
            assert scale.dtype == offset.dtype == torch.float32
            assert scale.shape == offset.shape == (width,)
            assert not offset.any()
            mine = getattr(q, f"{role}_scale")
            assert torch.equal(scale, mine.reshape(-1).expand(width))
            assert description[f"{name}.{linear}.kv_cache_scale"] == "C8"
    assert not [k for k in tensors if "qcore_kv" in k]

    model, _, meta = api.load_model(str(tmp_path / "asc"))
    assert meta["description"]["kv_cache_type"] == "C8"
    back = kv_quantizers(model)
    assert back.keys() == quantizers.keys()
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, result.model(input_ids=ids).logits)
    if scheme == "W8A8C8":
        for name, q in quantizers.items():
            assert back[name].spec == q.spec

    # a nonzero offset (vllm-ascend would ignore it) is named
    from safetensors.torch import save_file

    shard = tmp_path / "asc" / "quant_model_weights-00001-of-00001.safetensors"
    stored = load_file(str(shard))
    key = "model.layers.1.self_attn.v_proj.kv_cache_offset"
    stored[key] = torch.full_like(stored[key], 0.5)
    save_file(stored, str(shard), metadata={"format": "pt"})
    with pytest.raises(SavedModelError, match=f"{key}: nonzero"):
        api.load_model(str(tmp_path / "asc"))
