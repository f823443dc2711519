"""Float models whose decoder layers stay on disk until the pipeline reaches them: a skeleton
without weights (accelerate's ``init_empty_weights``) filled from memory-mapped safetensors
shards, so a float weight costs memory only while its pages are read (the backend's page-out
drops them once the layer is quantized); another ``dtype`` than the source's converts each
tensor as it is assigned."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from qcore.engine.finite import CORRUPT_SOURCE, describe_nonfinite, is_finite
from qcore.errors import ConfigError, NonFiniteError
from qcore.hostmemory import file_backed_bytes, module_ranges, page_out_view
from qcore.models.checkpoint import INDEX_FILE, SINGLE_FILE, SafetensorsFolder, folder_config

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                  "float16": torch.float16}


def resolve_dtype(choice: str, path: Path | None) -> torch.dtype:
    """``auto``: the ``dtype`` (or ``torch_dtype``) of the checkpoint's config.json; float32
    when it declares none, and for GGUF files, which dequantize to float32."""
    if choice != "auto":
        return DTYPES[choice]
    config = folder_config(path) if path is not None and path.is_dir() else {}
    name = config.get("dtype") or config.get("torch_dtype")
    return (DTYPES.get(name) if isinstance(name, str) else None) or torch.float32


def can_stream(path: Path | None) -> bool:
    """A local folder of safetensors weights (a GGUF file or a hub id is loaded whole)."""
    return (path is not None and path.is_dir() and (path / "config.json").is_file()
            and ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()))


class StreamedCheckpoint:
    """A safetensors model folder loaded one decoder layer at a time: ``model`` holds every
    tensor outside the decoder layers after :meth:`load_outside`; the decoder layers stay on
    the meta device until :meth:`load_layer` fills them."""

    def __init__(self, path: str | Path, dtype: torch.dtype = torch.float32) -> None:
        self.path = Path(path)
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

    def _to_read(self, module: nn.Module, prefix: str = "", recurse: bool = True) -> list[str]:
        """The model names of the (meta) tensors of ``module`` (named ``prefix``) that are
        read from the checkpoint."""
        named = [*module.named_parameters(recurse=recurse), *module.named_buffers(recurse=recurse)]
        return [prefix + n for n, t in named
                if t.device.type == "meta" and prefix + n not in self._not_read]

    def check(self) -> None:
        """Every tensor the model needs is listed by the checkpoint, before any work."""
        for name in self._to_read(self.model):
            if name not in self.tensors:
                raise ConfigError(f"checkpoint {self.path}: tensor {name} is missing (not in "
                                  f"{self.tensors.listing})")

    def _fill(self, module: nn.Module, prefix: str, names: list[str]) -> None:
        """Assign the tensors ``names`` of ``module`` (named ``prefix`` in the model) from
        the checkpoint, each checked finite a chunk at a time and its pages dropped right
        after: the embedding and head are read whole once, then only a few rows; a layer's
        weights are read again only at their linear's turn."""
        for name in names:
            stored = self.tensors.get(name)
            owner_name, _, attr = name[len(prefix):].rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            old = getattr(owner, attr)
            if tuple(stored.shape) != tuple(old.shape):
                raise ConfigError(f"checkpoint {self.path}: tensor {name} is {list(stored.shape)}, "
                                  f"the model's config needs {list(old.shape)}")
            value = stored.to(old.dtype)  # the skeleton's: ``dtype`` for float tensors
            if not is_finite(value, after_chunk=page_out_view):
                raise NonFiniteError(f"source weight {name} holds {describe_nonfinite(value)}: "
                                     f"{CORRUPT_SOURCE}")
            if isinstance(old, nn.Parameter):  # a parameter stays one, with requires_grad
                setattr(owner, attr, nn.Parameter(value, requires_grad=old.requires_grad))
            else:
                owner._buffers[attr] = value

    def load_outside(self, layers: list[nn.Module]) -> None:
        """Load everything outside the decoder layers, check it is finite, tie the head."""
        inside = {id(m) for layer in layers for m in layer.modules()}
        for name, module in self.model.named_modules():
            if id(module) not in inside:
                prefix = f"{name}." if name else ""
                self._fill(module, prefix, self._to_read(module, prefix, recurse=False))
        if self.tied:
            self.model.tie_weights()

    def load_layer(self, prefix: str, layer: nn.Module) -> None:
        """Fill decoder layer ``layer`` (named ``prefix``, e.g. ``model.layers.3.``) from
        the checkpoint and check it is finite."""
        self._fill(layer, prefix, self._to_read(layer, prefix))


@contextmanager
def page_out_after_forward(modules: Iterable[nn.Module],
                           release: Callable[[list[tuple[int, int]]], None]) -> Iterator[int]:
    """Within the block, each module's memory-mapped tensors go to ``release``
    (``Backend.release_host_memory``: clean pages dropped, re-read when touched) after each
    of its forwards, so evaluating a model mapped from its shards keeps about one decoder
    layer resident. Yields how many modules are mapped from files (only those get the hook)."""
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
