"""What every format that writes or reads other tools' checkpoints shares: sharded
safetensors with transformers' naming, a reader of a folder's tensors that names what is
missing or malformed, and the assembly of a model whose quantized linears are built from
stored codes (never from a float weight)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qcore.errors import SavedModelError
from qcore.io import chmod_as_new_file
from qcore.models.checkpoint import INDEX_FILE, SafetensorsFolder
from qcore.quant.linear import QuantLinear, replace_module


class NotExpressible(ValueError):
    """A model a format cannot hold without changing its numbers."""


def unique_state_dict(model: nn.Module, skip: set[str] = frozenset(), prefix: str = "",
                      skip_under: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The module's tensors on the CPU named ``prefix`` + local name, each storage once
    (safetensors refuses shared storage; a tied head is saved as transformers saves it,
    through its first name), less those of the modules named in ``skip`` and those whose
    names start with one of ``skip_under``."""
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict(prefix=prefix).items():
        if name.rsplit(".", 1)[0] in skip or (skip_under and name.startswith(skip_under)):
            continue
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen.add(key)
        out[name] = tensor.detach().contiguous().cpu()
    return out


#: transformers' default shard size
DEFAULT_MAX_SHARD_SIZE = "50GB"


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path,
                      max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
                      pattern: str = "model{suffix}.safetensors",
                      index_file: str = INDEX_FILE) -> list[str]:
    """``model.safetensors``, or shards ``model-0000i-of-0000n.safetensors`` and an index
    when the tensors exceed ``max_shard_size`` (transformers' naming); the files."""
    split = split_torch_state_dict_into_shards(tensors, filename_pattern=pattern,
                                               max_shard_size=max_shard_size)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: tensors[n].contiguous() for n in names}, str(folder / filename),
                  metadata={"format": "pt"})
        chmod_as_new_file(folder / filename)
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": split.tensor_to_filename}
        (folder / index_file).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return sorted(split.filename_to_tensors)


def expect_tensor(name: str, tensor: torch.Tensor, shape: tuple[int, ...],
                  dtypes: tuple[torch.dtype, ...]) -> None:
    """A stored tensor has the shape and one of the dtypes its layout prescribes."""
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes:
        want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise SavedModelError(f"tensor {name}: expected {want} {list(shape)}, found "
                              f"{str(tensor.dtype).removeprefix('torch.')} "
                              f"{list(tensor.shape)}")


MakeLinear = Callable[[str, nn.Linear, torch.dtype], "QuantLinear | None"]


def assemble(path: Path, tensors: SafetensorsFolder, make_linear: MakeLinear
             ) -> tuple[nn.Module, Any, dict[str, QuantLinear]]:
    """(model, tokenizer, quantized linears by name): the model's skeleton without
    allocated weights, each linear for which ``make_linear`` returns a QuantLinear swapped
    for it, every other tensor read from ``tensors`` (tied ones tied)."""
    config = AutoConfig.from_pretrained(path)
    config.quantization_config = None  # the skeleton stays plain: qcore fills it
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) \
        or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    quantized = {}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            built = make_linear(name, module, dtype)
            if built is not None:
                quantized[name] = built
    if not quantized:
        raise SavedModelError(f"{path}: no linear of the model is quantized in the checkpoint")
    for name, module in quantized.items():
        replace_module(model, name, module)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    state = {}
    for name, param in [*model.named_parameters(), *model.named_buffers()]:
        if param.device.type != "meta":
            continue
        if tied and name.endswith("lm_head.weight") and name not in tensors:
            continue  # tied: set by tie_weights below
        state[name] = tensors.get(name).to(param.dtype)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still_meta = [n for n, p in [*model.named_parameters(), *model.named_buffers()]
                  if p.device.type == "meta"]
    if still_meta:
        raise SavedModelError(f"{path}: tensors missing: {still_meta[:5]}")
    model.eval()
    return model, folder_tokenizer(path), quantized


def folder_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model folder, or None when it has none."""
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):
        return None


def layer_specs(quantized: dict[str, QuantLinear]) -> dict[str, dict[str, Any]]:
    """What a loaded checkpoint's metadata records of its quantized linears."""
    return {name: m.spec.model_dump(mode="json") for name, m in quantized.items()}
