"""The qcore format: safetensors of the quantized model plus qcore.json.

Layout of a saved folder::

    model.safetensors   every tensor (QuantLinear codes, scales, zeros, g_idx, floats)
    config.json         the transformers model config
    tokenizer files     as the tokenizer saves them
    qcore.json          run configuration, scheme, versions, a spec per QuantLinear and
                        per KV-cache quantizer

Saving is atomic (a temporary sibling folder renamed into place); loading rebuilds the
model skeleton without allocating weights, swaps in QuantLinear modules from their specs
and assigns the stored tensors, so outputs are bit-identical to the saved model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from qcore.hookspecs import hookimpl
from qcore.interfaces import Format, SavedModel
from qcore.io import atomic_directory
from qcore.quant.kvcache import kv_specs, restore_kv_quantization
from qcore.quant.linear import QuantLinear, QuantLinearSpec, build_transform, replace_module

METADATA_FILE = "qcore.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_VERSION = 1


def _tensors_for_saving(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied duplicates dropped (safetensors refuses shared storage)."""
    seen: dict[int, str] = {}
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
        if key in seen and tensor.numel():
            continue
        seen[key] = name
        out[name] = tensor.detach().contiguous().cpu()
    return out


class QcoreFormat(Format):
    name = "qcore"
    description = "safetensors + qcore.json with the run configuration (bit-exact reload)"

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return (Path(path) / METADATA_FILE).is_file()

    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel:
        layers = {
            name: module.spec.model_dump(mode="json")
            for name, module in model.named_modules() if isinstance(module, QuantLinear)
        }
        dtype = next(model.parameters()).dtype
        meta = {**metadata, "format": self.name, "format_version": FORMAT_VERSION,
                "dtype": str(dtype).removeprefix("torch."), "quantized_layers": layers,
                "kv_cache": kv_specs(model),
                "attn_implementation": getattr(model.config, "_attn_implementation", None)}
        with atomic_directory(path) as tmp:
            save_file(_tensors_for_saving(model), str(tmp / WEIGHTS_FILE),
                      metadata={"format": "pt"})
            model.config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        return SavedModel(path=Path(path), metadata=meta)

    def load(self, path: Path, modules: dict[str, type[nn.Module]]) -> tuple[nn.Module, Any, dict]:
        path = Path(path)
        meta = json.loads((path / METADATA_FILE).read_text())
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{path} was saved by a newer qcore (format_version "
                             f"{meta['format_version']} > {FORMAT_VERSION})")
        dtype = getattr(torch, meta.get("dtype", "float32"))
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if meta.get("attn_implementation"):  # same kernel as at save time: bit-exact outputs
            config._attn_implementation = meta["attn_implementation"]
        for name, raw in meta["quantized_layers"].items():
            spec = QuantLinearSpec.model_validate(raw)
            transform = build_transform(spec.input_transform, modules, name)
            replace_module(model, name, QuantLinear(spec, input_transform=transform, dtype=dtype))
        restore_kv_quantization(model, meta.get("kv_cache", {}), modules)
        state = load_file(str(path / WEIGHTS_FILE))
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"{path}: unexpected tensors {result.unexpected_keys[:5]}")
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
        if still_meta:
            raise ValueError(f"{path}: tensors missing from {WEIGHTS_FILE}: {still_meta[:5]}")
        model.eval()
        tokenizer = None
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            pass
        return model, tokenizer, meta


@hookimpl
def qcore_register_formats(register):
    register(QcoreFormat)
