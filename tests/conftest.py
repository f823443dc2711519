"""Shared fixtures: tiny random Llama/Qwen2 models, a tiny tokenizer, the real SmolLM2-135M."""

from __future__ import annotations

import copy
import os
import types

import pytest
import torch

from qcore import hookimpl

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tiny_config(kind: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  rms_norm_eps=1e-6, tie_word_embeddings=False)
    common.update(overrides)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    if kind == "qwen3":  # per-head q/k RMSNorms; head_dim is its own field there
        return Qwen3Config(head_dim=common["hidden_size"] // common["num_attention_heads"],
                           **common)
    raise ValueError(kind)


def make_tiny_model(kind: str = "llama", seed: int = 0, **overrides):
    """A tiny random decoder (float32, eval mode). GQA by default (4 heads, 2 KV heads)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _tiny_config(kind, **overrides)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # random init has tiny weights; widen norms so activations have outlier channels
    with torch.no_grad():
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.copy_(1 + torch.rand_like(norm.weight) * 3)
    return model.eval()


@pytest.fixture(params=["llama", "qwen2"])
def tiny_model(request):
    return make_tiny_model(request.param)


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture
def tiny_qwen2():
    return make_tiny_model("qwen2")


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A 512-token BPE tokenizer trained on pydoc topics in a second (no downloads)."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([topics[k] for k in sorted(topics)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.fixture
def calib_ids():
    """Random token windows (8 x 32) for tiny-model pipeline tests."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 512, (8, 32), generator=gen)


@pytest.fixture
def plugins():
    from qcore.plugins import PluginManager

    return PluginManager()


@pytest.fixture(scope="session")
def smollm2_master():
    """The real SmolLM2-135M-Instruct (float32), loaded once per session."""
    try:
        from qcore.engine.loading import smollm2_gguf
        smollm2_gguf()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    from qcore.api import load_model

    model, tokenizer, _ = load_model("smollm2")
    return model, tokenizer


@pytest.fixture
def smollm2(smollm2_master):
    """A fresh copy of SmolLM2-135M that a test may quantize in place."""
    model, tokenizer = smollm2_master
    return copy.deepcopy(model), tokenizer


@pytest.fixture
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, and lose a lot on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class CollectLayerReports:
    """An event listener keeping every LayerReport the pipeline fires."""

    def __init__(self):
        self.reports = []

    @hookimpl
    def qcore_layer_quantized(self, report):
        self.reports.append(report)


@pytest.fixture
def tiny_folder(tmp_path, tiny_tokenizer):
    """tmp_path holding ``tiny/`` (a saved tiny Qwen2 with tokenizer) and ``calib.txt``."""
    model = make_tiny_model("qwen2")
    model.save_pretrained(tmp_path / "tiny")
    tiny_tokenizer.save_pretrained(tmp_path / "tiny")
    (tmp_path / "calib.txt").write_text("\n\n".join(["Some calibration prose about code."] * 400))
    return tmp_path


def rtn_args(folder, *extra):
    """`qcore quantize` arguments for a fast RTN W4A16 g32 run of ``folder``'s tiny model."""
    return ["quantize", "--model", str(folder / "tiny"), "--method", "rtn", "--scheme", "W4A16",
            "--group-size", "32", "--calib", str(folder / "calib.txt"), "--samples", "2",
            "--seq-len", "16", "--batch-size", "1", "--no-progress", *extra]


def hide_package(monkeypatch, package: str) -> None:
    """Make ``import package`` (and its submodules) fail, as if it were not installed."""
    import builtins

    real = builtins.__import__

    def guarded(name, *args, **kwargs):
        if name == package or name.startswith(package + "."):
            raise ImportError(f"No module named {package!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded)


# ----------------------------------------------------------------------------- study
def tiny_grid(folder, **overrides):
    """A tiny study: the tiny Qwen2 folder, RTN at three schemes, perplexity, layer-error
    and kernel-time, all on the fixture's calibration text."""
    from qcore_study import StudyGrid
    text = {"source": str(folder / "calib.txt")}
    data = {
        "title": "tiny study",
        "models": [{"path": str(folder / "tiny"), "name": "tiny"}],
        "methods": [{"method": "rtn", "schemes": ["W4A16", "W8A8", "W4A4"]}],
        "group_size": 32,
        "calibration": {"data": text, "samples": 2, "seq_len": 16, "batch_size": 1},
        "evaluators": [
            {"evaluator": "perplexity", "options": {"data": text, "seq_len": 16,
                                                    "windows": 2}},
            {"evaluator": "layer-error", "options": {"data": text, "seq_len": 16,
                                                     "windows": 1}},
            {"evaluator": "kernel-time", "schemes": ["fp", "W8A8"],
             "options": {"data": text, "seq_len": 16, "windows": 1}},
        ],
        "error_windows": 1,
    }
    data.update(overrides)
    return StudyGrid.model_validate(data)


@pytest.fixture
def make_grid(tiny_folder):
    """``make_grid(**fields)``: the tiny grid with some fields replaced."""
    return lambda **overrides: tiny_grid(tiny_folder, **overrides)


# ----------------------------------------------------------------------------- NPU
def _unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    nibbles = [((packed >> (4 * j)) & 0xF) for j in range(8)]
    values = torch.stack(nibbles, dim=-1).reshape(packed.shape[0], -1)
    return torch.where(values >= 8, values - 16, values)


def fake_torch_npu() -> types.ModuleType:
    """A stand-in torch_npu implementing each operator as Ascend documents it (REFERENCE.md);
    torch_npu itself cannot be installed here (it breaks `import torch` without CANN)."""
    npu = types.ModuleType("torch_npu")

    def npu_convert_weight_to_int4pack(w):
        assert w.dtype == torch.int32 and w.shape[-1] % 8 == 0
        assert int(w.min()) >= -8 and int(w.max()) <= 7
        u = (w & 0xF).reshape(w.shape[0], -1, 8)
        out = torch.zeros(u.shape[:2], dtype=torch.int64)
        for j in range(8):
            out |= u[..., j].long() << (4 * j)
        return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)

    def npu_weight_quant_batchmatmul(x, weight, antiquant_scale, antiquant_offset=None,
                                     bias=None, antiquant_group_size=0):
        w = (_unpack_int4(weight) if weight.dtype == torch.int32 else weight).float()
        scale, offset = antiquant_scale.float(), antiquant_offset
        if antiquant_group_size:
            scale = scale.repeat_interleave(antiquant_group_size, dim=0)
            if offset is not None:
                offset = offset.repeat_interleave(antiquant_group_size, dim=0)
        if offset is not None:
            w = w + offset.float()  # the offset is ADDED
        y = x.float() @ (w * scale)
        return (y + bias if bias is not None else y).to(x.dtype)

    def npu_dynamic_quant(x, smooth_scales=None):
        scale = x.abs().amax(-1).float() / 127
        return torch.round(x / scale[..., None]).to(torch.int8), scale

    def npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
                         output_dtype=torch.float16):
        assert x1.dtype == torch.int8 and x2.dtype == torch.int8
        acc = (x1.to(torch.int64) @ x2.to(torch.int64)).double()
        out = acc * scale.double() * pertoken_scale.double()[:, None]
        return out.to(output_dtype)

    for fn in (npu_convert_weight_to_int4pack, npu_weight_quant_batchmatmul,
               npu_dynamic_quant, npu_quant_matmul):
        setattr(npu, fn.__name__, fn)
    return npu
