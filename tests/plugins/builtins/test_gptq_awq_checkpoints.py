"""GPTQ and AWQ checkpoints as GPTQModel/AutoGPTQ and AutoAWQ write them load into
QuantLinear modules bit for bit. The writers below follow those tools' packing loops
(written here from their documented layouts, independently of qcore's unpacking)."""

import json

import pytest
import torch
from safetensors.torch import save_file

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.errors import ConfigError, SavedModelError
from qcore.interfaces import DataSpec
from qcore.quant.linear import QuantLinear

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def _quantized(folder, method="rtn", options=None):
    config = RunConfig(model=str(folder / "tiny"), method=method, scheme="W4A16",
                       group_size=32, method_config=options or {},
                       calibration=CalibrationConfig(
                           data=DataSpec(source=str(folder / "calib.txt")), samples=2,
                           seq_len=16, batch_size=1))
    result = api.quantize(config, progress=False)
    for m in result.model.modules():  # the checkpoints store fp16 scales
        if isinstance(m, QuantLinear):
            m.scales = m.scales.half().float()
            m._dequant_cache = None
    return result


def _int32(words: torch.Tensor) -> torch.Tensor:
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def gptq_tensors(m: QuantLinear, bits: int, v1: bool) -> dict[str, torch.Tensor]:
    codes = m.codes().to(torch.int64).t()                 # (K, N), AutoGPTQ's intweight
    per = 32 // bits
    qweight = torch.zeros(codes.shape[0] // per, codes.shape[1], dtype=torch.int64)
    for j in range(per):                                  # rows i*per + j at bits*j
        qweight |= codes[j::per] << (bits * j)
    zeros = m.zeros.to(torch.int64).t() - (1 if v1 else 0)   # (groups, N)
    zeros = zeros & (2**bits - 1)
    qzeros = torch.zeros(zeros.shape[0], zeros.shape[1] // per, dtype=torch.int64)
    for j in range(per):
        qzeros |= zeros[:, j::per] << (bits * j)
    return {"qweight": _int32(qweight), "qzeros": _int32(qzeros),
            "scales": m.scales.t().half().contiguous(), "g_idx": m.g_idx.to(torch.int32)}


def awq_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    def pack(values):                                    # (rows, N) -> (rows, N / 8)
        out = torch.zeros(values.shape[0], values.shape[1] // 8, dtype=torch.int64)
        for col in range(values.shape[1] // 8):
            for i in range(8):
                out[:, col] |= values[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
        return _int32(out)

    return {"qweight": pack(m.codes().to(torch.int64).t()),
            "qzeros": pack(m.zeros.to(torch.int64).t()),
            "scales": m.scales.t().half().contiguous()}


def write_checkpoint(model, tokenizer, path, qconfig, tensors_of):
    path.mkdir()
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if isinstance(model.get_submodule(owner), QuantLinear):
            continue
        state[name] = tensor.contiguous()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            state.update({f"{name}.{k}": v for k, v in tensors_of(m).items()})
            if m.bias is not None:
                state[f"{name}.bias"] = m.bias.detach().half()
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = qconfig
    (path / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(path)


def _same(a, b):
    qa = {n: m for n, m in a.named_modules() if isinstance(m, QuantLinear)}
    qb = {n: m for n, m in b.named_modules() if isinstance(m, QuantLinear)}
    assert qa.keys() == qb.keys() and len(qa) == 14
    for name, m in qa.items():
        for buf in ("qweight", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(m, buf), getattr(qb[name], buf)), (name, buf)
    ids = torch.arange(2, 34).reshape(2, 16)
    with torch.no_grad():
        assert torch.equal(a(input_ids=ids).logits, b(input_ids=ids).logits)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_checkpoint_loads_bit_for_bit(tiny_folder, tmp_path, checkpoint_format):
    # act-order without static groups: a permuted g_idx, as GPTQ desc_act writes it
    q = _quantized(tiny_folder, "gptq", {"act_order": True, "static_groups": False})
    assert any(not torch.equal(m.g_idx, m.g_idx.sort().values)
               for m in q.model.modules() if isinstance(m, QuantLinear))
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True,
               "sym": False, "checkpoint_format": checkpoint_format}
    v1 = checkpoint_format == "gptq"
    write_checkpoint(q.model, q.tokenizer, tmp_path / "ckpt", qconfig,
                     lambda m: gptq_tensors(m, 4, v1))
    model, _, meta = api.load_model(str(tmp_path / "ckpt"))
    assert meta["format"] == "gptq"
    _same(q.model, model)


def test_awq_checkpoint_loads_bit_for_bit_and_as_compressed_tensors_reads_it(
        tiny_folder, tmp_path):
    q = _quantized(tiny_folder)
    qconfig = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True,
               "version": "gemm"}
    write_checkpoint(q.model, q.tokenizer, tmp_path / "awq", qconfig, awq_tensors)
    model, _, meta = api.load_model(str(tmp_path / "awq"))
    assert meta["format"] == "awq"
    _same(q.model, model)

    # compressed-tensors' own AutoAWQ converter reads the same checkpoint the same way
    ct = pytest.importorskip("compressed_tensors")
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

    assert ct
    convert_checkpoint(tmp_path / "awq", tmp_path / "ct",
                       AutoAWQConverter.from_pretrained(str(tmp_path / "awq")),
                       max_workers=1, device="cpu")
    converted, _, meta = api.load_model(str(tmp_path / "ct"))
    assert meta["format"] == "compressed-tensors"
    _same(q.model, converted)


def test_bad_checkpoints_name_the_tensor(tiny_folder, tmp_path):
    q = _quantized(tiny_folder)
    qconfig = {"quant_method": "gptq", "bits": 4, "group_size": 32, "sym": False,
               "checkpoint_format": "gptq_v2"}

    def truncated(m):
        tensors = gptq_tensors(m, 4, v1=False)
        tensors["scales"] = tensors["scales"][:1]
        return tensors

    write_checkpoint(q.model, q.tokenizer, tmp_path / "bad", qconfig, truncated)
    with pytest.raises(SavedModelError, match=r"model\.layers\.0\.self_attn\.q_proj\.scales: "
                                              r"expected float16"):
        api.load_model(str(tmp_path / "bad"))

    def missing(m):
        tensors = gptq_tensors(m, 4, v1=False)
        del tensors["qzeros"]
        return tensors

    write_checkpoint(q.model, q.tokenizer, tmp_path / "missing", qconfig, missing)
    with pytest.raises(SavedModelError, match=r"tensor model\.layers\.0\..*qzeros is missing"):
        api.load_model(str(tmp_path / "missing"))

    write_checkpoint(q.model, q.tokenizer, tmp_path / "three", {**qconfig, "bits": 3},
                     lambda m: gptq_tensors(m, 4, v1=False))
    with pytest.raises(SavedModelError, match="3-bit GPTQ packing is not supported"):
        api.load_model(str(tmp_path / "three"))


def test_checkpoint_formats_are_read_only(tiny_folder, tmp_path):
    config = RunConfig(model=str(tiny_folder / "tiny"), scheme="W4A16", group_size=32,
                       calibration=CalibrationConfig(
                           data=DataSpec(source=str(tiny_folder / "calib.txt")), samples=2,
                           seq_len=16),
                       save=str(tmp_path / "out"), format="awq")
    with pytest.raises(ConfigError, match="reads awq checkpoints but does not write them"):
        api.quantize(config, progress=False)


def test_an_unknown_quant_method_is_refused_by_name(tiny_folder, tmp_path):
    import shutil

    shutil.copytree(tiny_folder / "tiny", tmp_path / "bnb")
    config = json.loads((tmp_path / "bnb" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "bnb" / "config.json").write_text(json.dumps(config))
    with pytest.raises(SavedModelError, match="quant_method 'bitsandbytes' is not read by "
                                              "any installed format.*compressed-tensors"):
        api.load_model(str(tmp_path / "bnb"))
