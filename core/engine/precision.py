"""Where the engine rounds: the model's storage dtype against the dtype a layer works in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from qcore.context import Batches
from qcore.engine.activations import DiskActivations
from qcore.interfaces import Backend
from qcore.quant.kvcache import KVCacheQuantizer
from qcore.quant.linear import QuantLinear


@dataclass
class Precision:
    """Where the pipeline rounds. The model and the hidden states kept between layers are
    ``storage`` (the model's dtype); the layer being worked on runs in ``work``, the
    backend's compute dtype for it (float32 for a bf16 model on a CPU without bf16
    matmuls). Equal dtypes make every method here a no-op."""

    storage: torch.dtype
    work: torch.dtype

    @classmethod
    def of(cls, model: nn.Module, backend: Backend, forwards: bool = True) -> Precision:
        """``forwards``: whether any batch will run through the layers; without, a float32
        copy of each layer would only cost memory (RTN rounds the same codes from either)."""
        embedding = model.get_input_embeddings()
        storage = embedding.weight.dtype if embedding is not None else torch.float32
        return cls(storage, backend.compute_dtype(storage) if forwards else storage)

    def enter(self, layer: nn.Module, device: torch.device) -> None:
        """The layer on the device, in the work dtype."""
        layer.to(device)
        if self.work != self.storage:
            layer.to(dtype=self.work)

    def cast(self, obj: Any) -> Any:
        """Floating tensors in ``obj`` (lists, tuples, dicts) in the work dtype."""
        if self.work == self.storage:
            return obj
        if isinstance(obj, DiskActivations):
            return obj.cast(self.work)
        if isinstance(obj, torch.Tensor):
            return obj.to(self.work) if obj.is_floating_point() else obj
        if isinstance(obj, (tuple, list)):
            return type(obj)(self.cast(o) for o in obj)
        if isinstance(obj, dict):
            return {k: self.cast(v) for k, v in obj.items()}
        return obj

    def store(self, outputs: Batches) -> Batches:
        if self.work == self.storage:
            return outputs
        if isinstance(outputs, DiskActivations):
            return outputs.cast(self.storage)
        return [y.to(self.storage) for y in outputs]

    def restore(self, module: nn.Module) -> None:
        """A finished layer's float tensors back in the storage dtype, except a QuantLinear's
        float32-on-purpose tensors (scales, static activation parameters, online transforms;
        its bias follows the model) and KV-cache quantizers."""
        if self.work == self.storage:
            return
        if isinstance(module, QuantLinear) and module.bias is not None:
            module.bias.data = module.bias.data.to(self.storage)
        if isinstance(module, (QuantLinear, KVCacheQuantizer)):
            return
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(self.storage)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(self.storage))
        for child in module.children():
            self.restore(child)
