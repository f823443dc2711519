"""Which device each decoder layer runs on when a backend has several (accelerate's balanced
device map over their memory): the pipeline sends the calibration batches after each layer,
evaluation dispatches the whole model over them (:func:`dispatch`)."""

from __future__ import annotations

import logging

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory
from torch import nn

from qcore.interfaces import Backend

log = logging.getLogger(__name__)


def _balanced_map(module: nn.Module, no_split: list[str], backend: Backend,
                  label: str = "") -> dict[str, torch.device]:
    """accelerate's balanced device map of ``module`` over ``backend.devices`` (``no_split``
    classes never split); a submodule placed on no device is refused, named by ``label``."""
    devices = backend.devices
    # a device whose memory the backend cannot tell counts 2**50 bytes (even splits)
    max_memory = {i: backend.device_memory_bytes(d) or 2**50 for i, d in enumerate(devices)}
    balanced = get_balanced_memory(module, max_memory=max_memory, no_split_module_classes=no_split)
    device_map = infer_auto_device_map(module, max_memory=balanced,
                                       no_split_module_classes=no_split)
    unplaced = {k: v for k, v in device_map.items() if not isinstance(v, int)}
    if unplaced:
        name, where = next(iter(unplaced.items()))
        raise RuntimeError(f"{label}{name or 'the model'} does not fit on any of "
                           f"{', '.join(map(str, devices))} (accelerate placed it on {where!r})")
    return {k: devices[v] for k, v in device_map.items()}


def layer_devices(layers: nn.ModuleList, backend: Backend) -> list[torch.device]:
    """The device of each decoder layer: accelerate's balanced map of ``layers`` over
    ``backend.devices`` (a layer is never split); the backend's device when it has one."""
    devices = backend.devices
    if len(devices) <= 1 or len(layers) == 0:
        return [backend.device] * len(layers)
    device_map = _balanced_map(layers, sorted({type(layer).__name__ for layer in layers}),
                               backend, label="decoder layer ")
    placed = [device_map.get(str(i), device_map.get("")) for i in range(len(layers))]
    log.info("decoder layers over %d devices: %s", len(devices),
             ", ".join(f"{d}: {placed.count(d)}" for d in devices))
    return placed


def model_device_map(model: nn.Module, backend: Backend) -> dict[str, torch.device]:
    """accelerate's balanced device map of the whole model over ``backend.devices``
    (module name -> device; decoder layers never split)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    no_split = sorted({type(layer).__name__ for layer in getattr(decoder, "layers", [])})
    return _balanced_map(model, no_split, backend)


def dispatch(model: nn.Module, backend: Backend) -> nn.Module:
    """``model`` on the backend's device, or over its several devices with accelerate's
    ``dispatch_model`` (hooks move each module's inputs to its device)."""
    if len(backend.devices) <= 1:
        return model.to(backend.device)
    return dispatch_model(model, device_map=model_device_map(model, backend),
                          main_device=backend.devices[0])
