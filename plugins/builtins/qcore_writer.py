"""Writing a qcore folder: safetensors shards with a manifest, for a whole model or one
decoder layer at a time while the pipeline runs (resumable after a kill).

Shards hold whole units (a tensor of a whole-model save, every tensor of a decoder layer
when streaming) and are cut before a unit would push one past the size limit. Each tensor
is written to disk as it arrives, so writing holds no tensor in memory: a streamed save
keeps one decoder layer, not a shard's worth of them. A folder with one shard
holds ``model.safetensors``; more are named ``model-0000i-of-0000n.safetensors`` with
transformers' index, as vLLM and transformers read them.

A streamed save works in ``.NAME.partial`` next to the target. After each shard is
written, ``qcore-progress.json`` records (atomically) the run it belongs to, the shards
and, per finished layer, its report, quantized-linear specs and KV-cache specs. A killed
run leaves that folder; ``--resume`` continues from the last layer in a written shard
(layers after it are quantized again) and refuses a different run; without ``--resume``
the folder is never overwritten silently. The folder becomes ``NAME`` in one rename once
everything is written. A full disk removes the partial folder and says so.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open
from torch import nn

from qcore.errors import ConfigError, OutputError
from qcore.hostmemory import page_out_view
from qcore.interfaces import LayerWriter, SavedModel
from qcore.io import (
    atomic_write_json,
    chmod_as_new_file,
    clean_leftovers,
    dumps_json,
    parse_size,
    replace_directory,
)
from qcore.models.checkpoint import INDEX_FILE, SINGLE_FILE
from qcore.quant.kvcache import KVCacheQuantizer, attention_modules, restore_kv_quantization
from qcore.quant.linear import QuantLinear, QuantLinearSpec, build_transform, replace_module
from qcore_builtins.checkpoints import unique_state_dict

log = logging.getLogger(__name__)

#: qcore's shard limit: what a streamed save holds in memory before writing, at most
DEFAULT_MAX_SHARD_SIZE = "500MB"
PROGRESS_FILE = "qcore-progress.json"


#: bytes hashed at once by :func:`tensor_digest`
DIGEST_CHUNK = 64 * 2**20


def tensor_digest(tensor: torch.Tensor,
                  after_chunk: Callable[[torch.Tensor], Any] | None = None) -> str:
    """SHA-256 of a tensor's bytes (C order), read ``DIGEST_CHUNK`` bytes at a time;
    ``after_chunk(chunk)`` runs after each (e.g. to drop the pages of a mapped tensor)."""
    data = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
    digest = hashlib.sha256()
    for start in range(0, data.numel(), DIGEST_CHUNK):
        chunk = data[start: start + DIGEST_CHUNK]
        digest.update(chunk.numpy())
        if after_chunk is not None:
            after_chunk(chunk)
    return digest.hexdigest()


def quant_specs(module: nn.Module, prefix: str = "", skip_under: tuple[str, ...] = ()
                ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(quantized linear specs, KV-cache specs) by qualified name, as qcore.json records
    them, less the modules whose names start with one of ``skip_under``."""
    def kept(name: str) -> bool:
        return not (skip_under and f"{name}.".startswith(skip_under))

    linears = {f"{prefix}{n}": m.spec.model_dump(mode="json") for n, m in module.named_modules()
               if isinstance(m, QuantLinear) and kept(f"{prefix}{n}")}
    kv = {f"{prefix}{n}": m.qcore_kv.spec.model_dump(mode="json")
          for n, m in attention_modules(module).items()
          if isinstance(getattr(m, "qcore_kv", None), KVCacheQuantizer) and kept(f"{prefix}{n}")}
    return linears, kv


def rebuild_quantized(model: nn.Module, linears: dict[str, Any], kv: dict[str, Any],
                      modules: dict[str, type[nn.Module]], dtype: torch.dtype) -> None:
    """Empty QuantLinears and KV-cache quantizers in place, from their saved specs; their
    tensors are on the meta device (allocating them would hold a second copy of the model
    until the saved tensors are assigned)."""
    with torch.device("meta"):
        for name, raw in linears.items():
            spec = QuantLinearSpec.model_validate(raw)
            transform = build_transform(spec.input_transform, modules, name)
            replace_module(model, name, QuantLinear(spec, input_transform=transform,
                                                    dtype=dtype))
        restore_kv_quantization(model, kv, modules)


@contextmanager
def disk_full_removes(folder: Path, discard: Callable[[], None]) -> Iterator[None]:
    """A full disk while writing in ``folder``: remove the partial output and say so."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        discard()
        raise OutputError(f"the disk filled up while writing {folder} "
                          f"({exc.filename or 'a shard'}); the partial output was removed. "
                          "Free space and run again") from exc


#: safetensors' dtype names (the format's header spelling)
SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
#: bytes copied at once when a shard's data goes behind its header
COPY_CHUNK = 16 * 2**20


def write_tensor(file: BinaryIO, tensor: torch.Tensor) -> str:
    """Append a CPU tensor's bytes (C order, little-endian as on every host torch runs on)
    to ``file`` straight from its memory, ``DIGEST_CHUNK`` bytes at a time, dropping the
    pages of a memory-mapped tensor once written; its SHA-256."""
    return tensor_digest(tensor, after_chunk=lambda chunk: (file.write(chunk.numpy()),
                                                            page_out_view(chunk)))


class ShardedWriter:
    """Tensors into safetensors shards of at most ``max_bytes`` (a unit added at once
    stays in one shard), with each tensor's manifest entry.

    Nothing is held in memory for writing: each tensor's bytes go to the open shard's data
    file as it is added (the caller may drop it right after). A shard is finished when the
    next unit would overflow it, or at :meth:`close`: its header (names, dtypes, shapes,
    offsets; known only then) is written to a new file followed by a copy of the data,
    which is then removed. A safetensors file needs its header first, hence the copy: on
    disk, not in memory."""

    def __init__(self, folder: Path, max_bytes: int, header: dict[str, str],
                 shards: list[dict[str, Any]] | None = None) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.header = header
        self.shards: list[dict[str, Any]] = list(shards or [])  # {"file", "tensors"}
        self._open: dict[str, dict[str, Any]] = {}  # the open shard's safetensors entries
        self._entries: dict[str, dict[str, Any]] = {}  # and their manifest entries
        self._bytes = 0
        self._data: BinaryIO | None = None

    @property
    def _file(self) -> str:
        return f"shard-{len(self.shards) + 1:05d}.safetensors"

    def add(self, tensors: dict[str, torch.Tensor]) -> bool:
        """Write one unit; True when the units written before it were closed into a shard
        (they are durable from then on)."""
        for name, tensor in tensors.items():  # the whole unit is checked before writing
            if tensor.dtype not in SAFETENSORS_DTYPES:
                raise TypeError(f"{name}: safetensors cannot hold dtype {tensor.dtype}")
            if name in self._open or any(name in s["tensors"] for s in self.shards):
                raise ValueError(f"{name}: written twice")
        if not tensors:
            return False
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        flushed = bool(self._open) and self._bytes + size > self.max_bytes
        if flushed:
            self.flush()
        if self._data is None:
            self._data = open(self.folder / f"{self._file}.data", "wb")  # noqa: SIM115
        for name, tensor in sorted(tensors.items()):
            tensor = tensor.detach().cpu()
            nbytes = tensor.numel() * tensor.element_size()
            digest = write_tensor(self._data, tensor)
            self._open[name] = {"dtype": SAFETENSORS_DTYPES[tensor.dtype],
                                "shape": list(tensor.shape),
                                "data_offsets": [self._bytes, self._bytes + nbytes]}
            self._entries[name] = {"shape": list(tensor.shape),
                                   "dtype": str(tensor.dtype).removeprefix("torch."),
                                   "sha256": digest}
            self._bytes += nbytes
        return flushed

    def flush(self) -> None:
        """Finish the open shard: header, then its data."""
        if self._data is None:
            return
        self._data.close()
        self._data = None
        data, file = self.folder / f"{self._file}.data", self._file
        header = json.dumps({"__metadata__": self.header, **self._open},
                            separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # data 8-byte aligned, as safetensors writes
        with open(self.folder / f"{file}.tmp", "wb") as out, open(data, "rb") as src:
            out.write(struct.pack("<Q", len(header)))
            out.write(header)
            shutil.copyfileobj(src, out, COPY_CHUNK)
        (self.folder / f"{file}.tmp").rename(self.folder / file)
        data.unlink()
        chmod_as_new_file(self.folder / file)
        self.shards.append({"file": file, "tensors": self._entries})
        self._open, self._entries, self._bytes = {}, {}, 0

    def abandon(self) -> None:
        """Close the open shard's data file without finishing it (the folder is removed)."""
        if self._data is not None:
            try:
                self._data.close()  # flushing what is buffered can fail again on a full disk
            except OSError:
                pass
            finally:
                self._data = None

    def close(self) -> dict[str, dict[str, Any]]:
        """Write what is queued, give the shards their final names (and the index when
        there are several); the manifest of every tensor."""
        self.flush()
        n = len(self.shards)
        weight_map, entries, total = {}, {}, 0
        for i, shard in enumerate(self.shards, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            (self.folder / shard["file"]).rename(self.folder / final)
            for name, entry in shard["tensors"].items():
                weight_map[name] = final
                entries[name] = entry
                total += _entry_bytes(entry)
        if n > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(
                weight_map.items()))}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        return entries


def _entry_bytes(entry: dict[str, Any]) -> int:
    numel = 1
    for d in entry["shape"]:
        numel *= d
    return numel * getattr(torch, entry["dtype"]).itemsize


def _first_difference(old: Any, new: Any, path: str = "") -> str | None:
    """The first field (dotted path) where two JSON values differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            where = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return where
            found = _first_difference(old[key], new[key], where)
            if found:
                return found
        return None
    return None if old == new else (path or "(the whole run)")


def _lookup(data: Any, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data.get(key, "(absent)") if isinstance(data, dict) else "(absent)"
    return data


class QcoreLayerWriter(LayerWriter):
    """The qcore format written one decoder layer at a time (see the module docstring).

    ``complete`` writes config, tokenizer and qcore.json into the folder given the
    manifest and the specs of the layers, and returns the metadata; the format supplies
    it."""

    def __init__(self, path: Path, run: dict[str, Any], resume: bool, max_bytes: int,
                 header: dict[str, str], complete: Callable[..., dict[str, Any]]) -> None:
        self.target = Path(path).absolute()
        self.partial = self.target.with_name(f".{self.target.name}.partial")
        self.run = json.loads(dumps_json(run))
        self.complete = complete
        self.layers: dict[str, dict[str, Any]] = {}   # durable: in a written shard
        self.queued: dict[str, dict[str, Any]] = {}   # taken, not yet written
        progress = self._read_progress()
        if progress is not None and not progress["layers"]:
            progress = None  # nothing finished: nothing to lose by starting over
        if progress is not None and not resume:
            raise OutputError(
                f"--save {path}: an interrupted run left {len(progress['layers'])} finished "
                f"layer(s) in {self.partial}; pass --resume to continue it, or delete that "
                "folder to start over")
        if progress is not None:
            field = _first_difference(progress["run"], self.run)
            if field is not None:
                raise ConfigError(
                    f"--resume: the interrupted run in {self.partial} differs in {field} "
                    f"({_lookup(progress['run'], field)!r} there, "
                    f"{_lookup(self.run, field)!r} now); resume with the same settings or "
                    "delete that folder")
            self.layers = progress["layers"]
            shards = progress["shards"]
            keep = {s["file"] for s in shards} | {PROGRESS_FILE}
            for stale in self.partial.iterdir():  # written after the last progress record
                if stale.name not in keep:
                    stale.unlink()
            log.info("resuming %s: %d layer(s) already written", self.target,
                     len(self.layers))
        else:
            if resume:
                log.info("--resume: no interrupted run for %s, starting from the first "
                         "layer", self.target)
            clean_leftovers(self.target)
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            shards = []
        self.shards = ShardedWriter(self.partial, max_bytes, header, shards)
        with disk_full_removes(self.partial, self.discard):
            self._write_progress()

    def _read_progress(self) -> dict[str, Any] | None:
        file = self.partial / PROGRESS_FILE
        if not file.is_file():
            return None
        try:
            progress = json.loads(file.read_text(encoding="utf-8"))
            if not all(k in progress for k in ("run", "shards", "layers")):
                raise ValueError("missing run, shards or layers")
        except (OSError, ValueError) as exc:
            raise OutputError(f"{file}: unreadable ({exc}); delete {self.partial} to start "
                              "over") from exc
        return progress

    def _write_progress(self) -> None:
        atomic_write_json(self.partial / PROGRESS_FILE, {
            "run": self.run, "shards": self.shards.shards, "layers": self.layers})

    def finished(self, prefix: str) -> dict[str, Any] | None:
        entry = self.layers.get(prefix)
        return entry["report"] if entry else None

    def restore(self, model: nn.Module, prefix: str, modules: dict[str, type[nn.Module]]
                ) -> None:
        entry = self.layers[prefix]
        rebuild_quantized(model, entry["quantized_layers"], entry["kv_cache"], modules,
                          next(model.parameters()).dtype)
        state = {}
        for shard in self.shards.shards:
            names = [n for n in shard["tensors"] if n.startswith(f"{prefix}.")]
            if names:
                with safe_open(str(self.partial / shard["file"]), "pt") as f:
                    state.update({n: f.get_tensor(n) for n in names})
        model.load_state_dict(state, strict=False, assign=True)

    def write(self, prefix: str, layer: nn.Module, report: dict[str, Any]) -> None:
        tensors = unique_state_dict(layer, prefix=f"{prefix}.")
        linears, kv = quant_specs(layer, f"{prefix}.")
        with disk_full_removes(self.partial, self.discard):
            if self.shards.add(tensors):
                self.layers.update(self.queued)
                self.queued = {}
                self._write_progress()
        self.queued[prefix] = {"report": report, "quantized_layers": linears, "kv_cache": kv}

    def finish(self, model: nn.Module, tokenizer: Any, metadata: dict[str, Any]
               ) -> SavedModel:
        written = {**self.layers, **self.queued}
        skip = tuple(f"{p}." for p in written)
        with disk_full_removes(self.partial, self.discard):
            for name, tensor in unique_state_dict(model, skip_under=skip).items():
                self.shards.add({name: tensor})
            (self.partial / PROGRESS_FILE).unlink()
            entries = self.shards.close()
            linears, kv = quant_specs(model, skip_under=skip)
            for entry in written.values():
                linears.update(entry["quantized_layers"])
                kv.update(entry["kv_cache"])
            meta = self.complete(self.partial, model, tokenizer, metadata, entries, linears,
                                 kv)
        replace_directory(self.partial, self.target)
        return SavedModel(path=self.target, metadata=meta)

    def discard(self) -> None:
        if hasattr(self, "shards"):
            self.shards.abandon()
        shutil.rmtree(self.partial, ignore_errors=True)


def max_shard_bytes(size: str | None) -> int:
    return parse_size(size or DEFAULT_MAX_SHARD_SIZE)
