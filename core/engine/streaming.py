"""Float models whose decoder layers stay on disk until the pipeline reaches them.

The skeleton is built without allocating weights (accelerate's ``init_empty_weights``);
everything outside the decoder layers (embeddings, final norm, head) is then assigned
from the checkpoint, and each decoder layer is assigned when :meth:`load_layer` is
called. Tensors come memory-mapped from the safetensors shards, so a float weight costs
memory only while its pages are read, and the backend's page-out drops them once the
layer is quantized. In the source dtype nothing is copied; another ``dtype`` converts each
tensor as it is assigned.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qcore.engine.finite import describe_nonfinite, is_finite
from qcore.errors import ConfigError, NonFiniteError
from qcore.hostmemory import file_backed_bytes, module_ranges, page_out_view
from qcore.models.checkpoint import INDEX_FILE, SINGLE_FILE, SafetensorsFolder

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def checkpoint_dtype(path: Path) -> torch.dtype | None:
    """The dtype a model folder's config.json declares (``dtype`` or ``torch_dtype``)."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = config.get("dtype") or config.get("torch_dtype") if isinstance(config, dict) \
        else None
    return DTYPES.get(name) if isinstance(name, str) else None


def resolve_dtype(choice: str, path: Path | None) -> torch.dtype:
    """``auto``: the checkpoint's own dtype (float32 when it declares none, and for GGUF
    files, which dequantize to float32); else the named dtype."""
    if choice != "auto":
        return DTYPES[choice]
    declared = checkpoint_dtype(path) if path is not None and path.is_dir() else None
    return declared or torch.float32


def can_stream(path: Path | None) -> bool:
    """A local folder of safetensors weights (a GGUF file or a hub id is loaded whole)."""
    return (path is not None and path.is_dir() and (path / "config.json").is_file()
            and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()))


def _assign(owner: nn.Module, attr: str, old: torch.Tensor, value: torch.Tensor) -> None:
    """Put ``value`` in place of ``owner``'s (meta) tensor ``attr`` (``old``), keeping
    whether it is a parameter or a buffer, and its requires_grad."""
    if isinstance(old, nn.Parameter):
        setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    else:
        owner._buffers[attr] = value


class StreamedCheckpoint:
    """A safetensors model folder loaded one decoder layer at a time.

    ``model`` holds every tensor outside the decoder layers after :meth:`load_outside`;
    the decoder layers stay on the meta device until :meth:`load_layer` fills them."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.path = Path(path)
        self.dtype = dtype
        self.tensors = SafetensorsFolder(self.path)
        config = AutoConfig.from_pretrained(self.path)
        with init_empty_weights(include_buffers=False):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.model.eval()
        self.tied = bool(getattr(config, "tie_word_embeddings", False))
        head = self.model.get_output_embeddings()
        head_name = next((n for n, m in self.model.named_modules() if m is head), None)
        #: a tied head comes from the embedding, whether or not the checkpoint repeats it
        self._not_read = {f"{head_name}.weight"} if self.tied and head_name else set()

    def _wanted(self, names: list[str]) -> list[str]:
        """The checkpoint names of these model tensors."""
        return [n for n in names if n not in self._not_read]

    def _meta_names(self, module: nn.Module, recurse: bool = True) -> list[str]:
        return [n for n, t in [*module.named_parameters(recurse=recurse),
                               *module.named_buffers(recurse=recurse)]
                if t.device.type == "meta"]

    def check(self) -> None:
        """Every tensor the model needs is listed by the checkpoint, before any work."""
        for name in self._wanted(self._meta_names(self.model)):
            if name not in self.tensors:
                raise ConfigError(f"checkpoint {self.path}: tensor {name} is missing (not in "
                                  f"{self.tensors.listing})")

    def _fill(self, module: nn.Module, prefix: str, local: list[str]) -> None:
        """Assign the tensors ``local`` of ``module`` (named ``prefix`` in the model) from
        the checkpoint, each checked finite with its pages dropped right after: the
        embedding and head are read whole once, then only a few rows; a layer's weights are
        read again only when their linear's turn comes."""
        for name in self._wanted([f"{prefix}{n}" for n in local]):
            stored = self.tensors.get(name)
            owner_name, _, attr = name[len(prefix):].rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = getattr(owner, attr)
            if tuple(stored.shape) != tuple(old.shape):
                raise ConfigError(f"checkpoint {self.path}: tensor {name} is "
                                  f"{list(stored.shape)}, the model's config needs "
                                  f"{list(old.shape)}")
            value = stored.to(old.dtype)  # the skeleton's: ``dtype`` for float tensors
            _check_finite(name, value)
            _assign(owner, attr, old, value)

    def load_outside(self, layers: list[nn.Module]) -> None:
        """Load everything outside the decoder layers, check it is finite, tie the head."""
        inside = {id(m) for layer in layers for m in layer.modules()}
        for name, module in self.model.named_modules():
            if id(module) not in inside:
                self._fill(module, f"{name}." if name else "",
                           self._meta_names(module, recurse=False))
        if self.tied:
            self.model.tie_weights()

    def load_layer(self, prefix: str, layer: nn.Module) -> None:
        """Fill decoder layer ``layer`` (named ``prefix``, e.g. ``model.layers.3.``) from
        the checkpoint and check it is finite."""
        self._fill(layer, prefix, self._meta_names(layer))


def _check_finite(name: str, tensor: torch.Tensor) -> None:
    """Check a source tensor a chunk at a time, dropping each chunk's pages once read when
    it is mapped from the checkpoint (a no-op for a converted copy)."""
    if not is_finite(tensor, after_chunk=page_out_view):
        raise NonFiniteError(
            f"source weight {name} holds {describe_nonfinite(tensor)}: the checkpoint is "
            "corrupt or was saved after a diverged training step; nothing was quantized")


def release_layer(layer: nn.Module) -> None:
    """Drop a layer's tensors (to the meta device) once they are written elsewhere."""
    layer.to("meta")


@contextmanager
def page_out_after_forward(modules: Iterable[nn.Module],
                           release: Callable[[list[tuple[int, int]]], None]) -> Iterator[int]:
    """Within the block, each module's memory-mapped tensors are handed to ``release``
    (``Backend.release_host_memory``: their clean pages are dropped, re-read from the file
    when touched again) after each of its forwards, so evaluating a model mapped from its
    shards keeps about one decoder layer resident. Yields how many modules are mapped from
    files (only those get the hook)."""
    handles = []
    for module in modules:
        ranges = sorted(module_ranges(module))
        if file_backed_bytes(ranges):
            handles.append(module.register_forward_hook(
                lambda *_args, _ranges=ranges: release(_ranges)))
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()


def mapped_bytes(module: nn.Module) -> int:
    """Bytes of ``module``'s tensors that are mapped from files (a streamed checkpoint or
    a saved model read back)."""
    return file_backed_bytes(module_ranges(module))
