"""Which device each decoder layer runs on when a backend has several, decided by
accelerate (a balanced device map over the devices' memory), and moving batches there.

With one device every layer runs on it, as the pipeline always did. With several, the
pipeline quantizes layer ``i`` on ``layer_devices(...)[i]`` and sends the calibration
batches after it (``accelerate.utils.send_to_device``); evaluation dispatches the whole
model over the same devices (:func:`dispatch`), so a quantized model larger than one
device still runs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from accelerate import dispatch_model, infer_auto_device_map
from accelerate.utils import get_balanced_memory, send_to_device
from torch import nn

from qcore.interfaces import Backend

log = logging.getLogger(__name__)

#: memory assumed per device when a backend cannot tell (the map then splits evenly)
_UNKNOWN = 2**50


def _max_memory(backend: Backend) -> dict[int, int]:
    return {i: backend.device_memory_bytes(d) or _UNKNOWN
            for i, d in enumerate(backend.devices)}


def _balanced_map(module: nn.Module, no_split: list[str], backend: Backend,
                  label: str = "") -> dict[str, torch.device]:
    """accelerate's balanced device map of ``module`` over ``backend.devices`` (submodule
    name -> device; ``no_split`` classes never split); a submodule accelerate could place
    on no device is refused by name (``label`` + its name)."""
    devices = backend.devices
    balanced = get_balanced_memory(module, max_memory=_max_memory(backend),
                                   no_split_module_classes=no_split)
    device_map = infer_auto_device_map(module, max_memory=balanced,
                                       no_split_module_classes=no_split)
    unplaced = {k: v for k, v in device_map.items() if not isinstance(v, int)}
    if unplaced:
        name, where = next(iter(unplaced.items()))
        raise RuntimeError(f"{label}{name or 'the model'} does not fit on any of "
                           f"{', '.join(map(str, devices))} (accelerate placed it on "
                           f"{where!r})")
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


def to_device(obj: Any, device: torch.device) -> Any:
    """Tensors in ``obj`` (nested lists, tuples, dicts) on ``device``."""
    return send_to_device(obj, device)


def model_device_map(model: nn.Module, backend: Backend) -> dict[str, torch.device]:
    """accelerate's balanced device map of the whole model over ``backend.devices``
    (module name -> device; decoder layers never split)."""
    return _balanced_map(model, sorted({type(layer).__name__
                                        for layer in _decoder_layers(model)}), backend)


def dispatch(model: nn.Module, backend: Backend) -> nn.Module:
    """``model`` on the backend's device, or over its devices with accelerate's
    ``dispatch_model`` (hooks move each module's inputs to its device) when it has
    several."""
    if len(backend.devices) <= 1:
        return model.to(backend.device)
    return dispatch_model(model, device_map=model_device_map(model, backend),
                          main_device=backend.devices[0])


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    return list(getattr(decoder, "layers", []))
