"""The inputs of a model's first decoder layer: hidden states and the keyword arguments the
model passes it (position embeddings, masks), captured by running the model up to it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from qcore.context import Batches
from qcore.interfaces import Backend
from qcore.models.adapter import ArchitectureAdapter


class _StopForward(Exception):
    pass


def _move(module: nn.Module, device: torch.device | str) -> None:
    """The module's own parameters and buffers (not its children's) to ``device``."""
    for p in module.parameters(recurse=False):
        p.data = p.data.to(device)
    for name, b in module.named_buffers(recurse=False):
        setattr(module, name, b.to(device))


@contextmanager
def _non_layer_modules_on(model: nn.Module, adapter: ArchitectureAdapter, device: torch.device
                          ) -> Iterator[None]:
    """Move everything except the decoder layers to ``device`` for the duration."""
    inside = {id(m) for m in adapter.decoder_layers().modules()}
    moved: list[nn.Module] = []
    for module in model.modules():
        own = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if id(module) not in inside and any(t.device != device for t in own):
            _move(module, device)
            moved.append(module)
    try:
        yield
    finally:
        if device.type != "cpu":
            for module in moved:
                _move(module, "cpu")


@torch.no_grad()
def capture_first_layer_inputs(model: nn.Module, adapter: ArchitectureAdapter,
                               input_ids: torch.Tensor, backend: Backend, batch_size: int,
                               into: Batches | None = None) -> tuple[Batches, list[dict[str, Any]]]:
    """Hidden states and keyword arguments reaching decoder layer 0, one entry per batch;
    the hidden states are appended to ``into`` (a new list by default)."""
    layer0 = adapter.decoder_layers()[0]
    hidden: Batches = [] if into is None else into
    kwargs_list: list[dict[str, Any]] = []

    def catch(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        h = args[0] if args else kwargs.pop("hidden_states")
        hidden.append(h.detach())
        kw = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values",
                                                             "past_key_value", "use_cache")}
        kwargs_list.append(kw)
        raise _StopForward

    handle = layer0.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with _non_layer_modules_on(model, adapter, backend.device):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start: start + batch_size].to(backend.device)
                try:
                    model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        handle.remove()
    return hidden, kwargs_list
