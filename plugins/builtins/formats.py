"""The qcore format: safetensors of the quantized model plus qcore.json.

Layout of a saved folder::

    model.safetensors   every tensor (QuantLinear codes, scales, zeros, g_idx, floats), or
                        shards model-0000i-of-0000n.safetensors and their index when the
                        model exceeds the shard size (qcore_writer; 500MB by default)
    config.json         the transformers model config
    tokenizer files     as the tokenizer saves them
    qcore.json          run configuration, scheme, versions, a spec per QuantLinear and
                        per KV-cache quantizer, and a manifest: every tensor's name, shape,
                        dtype and SHA-256

Saving is atomic (a temporary sibling folder renamed into place), whole or, while the
pipeline runs, one decoder layer at a time (:class:`qcore_builtins.qcore_writer.
QcoreLayerWriter`, resumable); loading validates
qcore.json against :class:`QcoreMetadata` (unknown or malformed fields are errors), checks
every stored tensor against the manifest (a missing, extra, reshaped, retyped or altered
tensor is an error naming it), rebuilds the model skeleton without allocating weights,
swaps in QuantLinear modules from their specs and assigns the stored tensors, so outputs
are bit-identical to the saved model's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import init_empty_weights
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qcore.config import validation_summary
from qcore.errors import SavedModelError
from qcore.hookspecs import hookimpl
from qcore.hostmemory import page_out_view
from qcore.interfaces import Format, LayerWriter, SavedModel
from qcore.io import atomic_directory, dumps_json
from qcore.models.checkpoint import INDEX_FILE, SafetensorsFolder, quantization_config
from qcore_builtins.checkpoints import folder_tokenizer, unique_state_dict
from qcore_builtins.qcore_writer import (
    QcoreLayerWriter,
    ShardedWriter,
    max_shard_bytes,
    quant_specs,
    rebuild_quantized,
    tensor_digest,
)

METADATA_FILE = "qcore.json"
WEIGHTS_FILE = "model.safetensors"
#: 3: shards and index past the shard size; 2: tensor manifest; 1 (no manifest) still
#: loads, unverified
FORMAT_VERSION = 3
#: safetensors header key marking a qcore file, so a folder that lost its qcore.json is
#: recognised and refused rather than loaded as a float model
HEADER_KEY = "qcore_format_version"
#: buffer names only a QuantLinear has (for folders saved before HEADER_KEY existed)
QUANT_TENSOR_SUFFIXES = (".qweight", ".g_idx")

log = logging.getLogger(__name__)


class TensorEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int]
    dtype: str
    sha256: str


class QcoreMetadata(BaseModel):
    """What qcore.json may hold; anything else in it is an error naming the field."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["qcore"]
    format_version: StrictInt = Field(ge=1)
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    quantized_layers: dict[str, dict[str, Any]]
    kv_cache: dict[str, dict[str, Any]] = Field(default_factory=dict)
    attn_implementation: str | None = None
    tensors: dict[str, TensorEntry] | None = None
    run: dict[str, Any] | None = None
    scheme: dict[str, Any] | None = None
    report: dict[str, Any] | None = None
    versions: dict[str, str | None] = Field(default_factory=dict)
    #: set by `qcore export`: the model this folder was written from, and its format
    source: str | None = None
    source_format: str | None = None


def read_metadata(path: Path) -> QcoreMetadata:
    """Parse and validate qcore.json; every problem is a one-line SavedModelError."""
    file = Path(path) / METADATA_FILE
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise SavedModelError(f"{file} line {exc.lineno} column {exc.colno}: not valid JSON "
                              f"({exc.msg})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SavedModelError(f"{file}: unreadable ({exc})") from exc
    if not isinstance(raw, dict):
        raise SavedModelError(f"{file}: expected a JSON object, got {type(raw).__name__}")
    version = raw.get("format_version")
    if isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION:
        raise SavedModelError(f"{file}: saved by a newer qcore (format_version {version} > "
                              f"{FORMAT_VERSION}); upgrade qcore to load it")
    try:
        return QcoreMetadata.model_validate(raw)
    except ValidationError as exc:
        raise SavedModelError(f"{file}: {validation_summary(exc)}") from exc


def verify_tensors(path: Path, state: dict[str, torch.Tensor],
                   expected: dict[str, TensorEntry]) -> None:
    """Every tensor the manifest lists, with its shape, dtype and bytes, and no other."""
    file = Path(path) / (WEIGHTS_FILE if (Path(path) / WEIGHTS_FILE).is_file() else INDEX_FILE)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing:
        raise SavedModelError(f"{file}: tensor {missing[0]} is missing"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if extra:
        raise SavedModelError(f"{file}: tensor {extra[0]} is not in the manifest of "
                              f"{METADATA_FILE}" + (f" (and {len(extra) - 1} more)"
                                                    if len(extra) > 1 else ""))
    for name, entry in expected.items():
        t = state[name]
        dtype = str(t.dtype).removeprefix("torch.")
        if list(t.shape) != entry.shape or dtype != entry.dtype:
            raise SavedModelError(f"{file}: tensor {name} is {dtype} {list(t.shape)}, the "
                                  f"manifest says {entry.dtype} {entry.shape}")
        # a mapped tensor's pages go again as soon as they are hashed
        if tensor_digest(t, after_chunk=page_out_view) != entry.sha256:
            raise SavedModelError(f"{file}: tensor {name} was altered after saving (its "
                                  "SHA-256 differs from the manifest)")


HEADER = {"format": "pt", HEADER_KEY: str(FORMAT_VERSION)}


def complete_folder(folder: Path, model: nn.Module, tokenizer: Any, metadata: dict[str, Any],
                    tensors: dict[str, dict[str, Any]], linears: dict[str, Any],
                    kv: dict[str, Any]) -> dict[str, Any]:
    """Write config, tokenizer and qcore.json next to the written shards (``tensors``:
    their manifest; ``linears``/``kv``: the specs of every quantized module); the
    metadata written."""
    dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
    meta = {**metadata, "format": QcoreFormat.name, "format_version": FORMAT_VERSION,
            "dtype": str(dtype).removeprefix("torch."), "quantized_layers": linears,
            "kv_cache": kv,
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
            "tensors": tensors}
    try:  # never write what would not load
        QcoreMetadata.model_validate(json.loads(dumps_json(meta)))
    except ValidationError as exc:
        raise ValueError(f"metadata for {folder}: {validation_summary(exc)}") from exc
    model.config.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    (folder / METADATA_FILE).write_text(dumps_json(meta, indent=2) + "\n")
    return meta


class QcoreFormat(Format):
    name = "qcore"
    description = "safetensors + qcore.json with the run configuration (bit-exact reload)"

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return (Path(path) / METADATA_FILE).is_file()

    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel:
        linears, kv = quant_specs(model)
        metadata = dict(metadata)
        max_bytes = max_shard_bytes(metadata.pop("max_shard_size", None))  # not in qcore.json
        with atomic_directory(path) as tmp:
            shards = ShardedWriter(tmp, max_bytes, HEADER)
            for name, tensor in unique_state_dict(model).items():
                shards.add({name: tensor})
            meta = complete_folder(tmp, model, tokenizer, metadata, shards.close(),
                                   linears, kv)
        return SavedModel(path=Path(path), metadata=meta)

    def layer_writer(self, path: Path, run: dict[str, Any], resume: bool = False,
                     max_shard_size: str | None = None) -> LayerWriter:
        return QcoreLayerWriter(path, run, resume, max_shard_bytes(max_shard_size), HEADER,
                                complete_folder)

    @classmethod
    def diagnose(cls, path: Path) -> str | None:
        file = _first_weights_file(Path(path))
        if cls.can_load(path) or file is None:
            return None
        try:
            with safe_open(str(file), "pt") as f:
                header = f.metadata() or {}
                keys = list(f.keys())
        except (SafetensorError, OSError):
            return None
        marked = HEADER_KEY in header
        quant = [k for k in keys if k.endswith(QUANT_TENSOR_SUFFIXES)]
        if marked or (quant and quantization_config(path) is None):
            return (f"{path} holds qcore quantized tensors ({quant[0] if quant else file.name}) "
                    f"but no {METADATA_FILE}: without it the model cannot be rebuilt (it would "
                    "load as a float model with random weights); restore the file or "
                    "quantize again")
        return None

    def load(self, path: Path, modules: dict[str, type[nn.Module]]) -> tuple[nn.Module, Any, dict]:
        path = Path(path)
        parsed = read_metadata(path)
        meta = parsed.model_dump()
        folder = SafetensorsFolder(path, error=SavedModelError)
        state = {name: folder.get(name) for name in folder.weight_map}
        if parsed.tensors is None:
            log.warning("%s has no tensor manifest (format_version %d): its tensors are not "
                        "verified", path, parsed.format_version)
        else:
            verify_tensors(path, state, parsed.tensors)
        dtype = getattr(torch, parsed.dtype)
        config = AutoConfig.from_pretrained(path)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        if meta.get("attn_implementation"):  # same kernel as at save time: bit-exact outputs
            config._attn_implementation = meta["attn_implementation"]
        rebuild_quantized(model, meta["quantized_layers"], meta.get("kv_cache", {}), modules,
                          dtype)
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise SavedModelError(f"{path}: tensors the model has no place for: "
                                  f"{result.unexpected_keys[:5]}")
        model.tie_weights()
        still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        still_meta += [n for n, b in model.named_buffers() if b.device.type == "meta"]
        if still_meta:
            raise SavedModelError(f"{path}: tensors missing from its safetensors: "
                                  f"{still_meta[:5]}")
        model.eval()
        return model, folder_tokenizer(path), meta


def _first_weights_file(path: Path) -> Path | None:
    """``model.safetensors``, or the first shard its index names."""
    if (path / WEIGHTS_FILE).is_file():
        return path / WEIGHTS_FILE
    try:
        shards = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
        first = path / sorted(shards.values())[0]
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError):
        return None
    return first if first.is_file() else None


@hookimpl
def qcore_register_formats(register):
    register(QcoreFormat)
