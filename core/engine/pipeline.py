"""The layer-wise calibration loop every quantizer runs in (and the group-size check made
before it): layer 0's inputs are captured, then each decoder layer in turn runs in float on
the backend's device, is quantized (through :class:`LayerContext`) and passes its quantized
(or float) outputs on; only one decoder layer and the activation cache are there at a time."""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate.utils import send_to_device
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.console import Steps
from qcore.context import Batches, LayerContext, batch_shapes, hidden_of
from qcore.engine.activations import DiskActivations, plan_activations
from qcore.engine.finite import all_finite, nonfinite_cause
from qcore.engine.placement import layer_devices
from qcore.engine.precision import Precision
from qcore.errors import NonFiniteError
from qcore.hostmemory import module_ranges
from qcore.interfaces import Backend, LayerWriter, Quantizer
from qcore.models.adapter import ArchitectureAdapter
from qcore.models.capture import capture_first_layer_inputs
from qcore.quant.linear import cached_dequantization
from qcore.quant.metrics import relative_mse
from qcore.reports import LayerReport, QuantizationReport
from qcore.schemes import QuantScheme

__all__ = ["LoopOptions", "check_group_size", "run_layerwise"]

log = logging.getLogger(__name__)

#: fills a decoder layer's float tensors (named prefix + local name) from a checkpoint
LayerSource = Callable[[str, nn.Module], None]


class LoopOptions(BaseModel):
    """How :func:`run_layerwise` runs; every field has the default a plain run uses."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, frozen=True)

    #: the run's plugin manager: events go through its hooks (None: no events)
    plugins: Any = None
    #: where each layer's inputs come from; None: the quantizer's ``propagation``
    propagation: Literal["quantized", "full"] | None = None
    batch_size: int = Field(default=4, gt=0)
    #: calibration windows each layer's relative MSE is measured on (None: all); fewer spare
    #: a float forward of the rest, unless every float output is needed anyway
    error_windows: int | None = Field(default=4, ge=0)
    progress: bool = True
    #: streaming: fills each decoder layer from the checkpoint just before its turn
    source: LayerSource | None = None
    #: streaming: takes each finished layer, which is then dropped
    writer: LayerWriter | None = None
    #: module classes a resumed layer's online transforms are rebuilt from
    modules: dict[str, type[nn.Module]] = Field(default_factory=dict)
    activation_budget: int | None = None
    offload_dir: Path | None = None


@torch.no_grad()
def run_layerwise(model: nn.Module, quantizer: Quantizer, adapter: ArchitectureAdapter,
                  backend: Backend, calib_ids: torch.Tensor,
                  options: LoopOptions | None = None, **fields: Any) -> QuantizationReport:
    """Quantize ``model`` in place, one decoder layer at a time (``options``, or its fields
    as keywords: :class:`LoopOptions`). Streaming: with ``source`` the layers start on the
    meta device and are filled just before their turn; with ``writer`` each finished layer
    is handed over and dropped, so memory follows one layer. A layer the writer already
    holds from an interrupted run is not quantized again: only its outputs are recomputed
    (the saved quantized layer's, or the float layer's under full propagation)."""
    options = options.model_copy(update=fields) if options else LoopOptions(**fields)
    return LayerLoop(model, quantizer, adapter, backend, options).run(calib_ids)


class LayerLoop:
    """The state one run carries from layer to layer, and the phases of each layer."""

    def __init__(self, model: nn.Module, quantizer: Quantizer, adapter: ArchitectureAdapter,
                 backend: Backend, options: LoopOptions) -> None:
        self.model, self.quantizer, self.adapter = model, quantizer, adapter
        self.backend, self.options = backend, options
        self.propagation = options.propagation or quantizer.propagation
        #: every batch's float outputs are needed (not only the error windows')
        self.all_fp = self.propagation == "full" or quantizer.needs_fp_outputs
        self.need_q = self.propagation == "quantized"
        self.report = QuantizationReport(method=quantizer.name,
                                         scheme=quantizer.scheme.model_dump())

    def run(self, calib_ids: torch.Tensor) -> QuantizationReport:
        started = time.perf_counter()
        self.backend.reset_peak_memory()
        self.model.eval()
        self.quantizer.prepare(self.model, self.adapter)
        windows, seq_len = calib_ids.shape
        precision = Precision.of(self.model, self.backend, forwards=windows > 0)
        hidden = self.model.get_input_embeddings().weight.shape[-1]
        plan = plan_activations(windows, seq_len, hidden, self.options.batch_size,
                                (precision.storage, precision.work), self.all_fp,
                                self.options.activation_budget, self.options.offload_dir)
        (log.warning if plan.offload else log.info)("%s", plan.describe())
        with plan.containers(self.backend.device) as new_batches:
            self.new_batches = new_batches
            self._capture(calib_ids)
            self._layers()
        self.quantizer.finalize(self.model, self.adapter)
        mem = self.backend.memory_stats()
        self.report.seconds = time.perf_counter() - started
        self.report.peak_rss_mb = mem.peak_rss_mb
        self.report.peak_device_mb = mem.device_peak_mb
        if self.options.plugins is not None:
            self.options.plugins.hook.qcore_model_quantized(report=self.report, model=self.model)
        return self.report

    def _capture(self, calib_ids: torch.Tensor) -> None:
        """Layer 0's inputs, and how many leading batches the error is measured on."""
        inputs, kwargs = capture_first_layer_inputs(self.model, self.adapter, calib_ids,
                                                    self.backend, self.options.batch_size,
                                                    into=self.new_batches())
        kwargs = [send_to_device(kw, self.backend.device) for kw in kwargs]
        # the embedding rows the calibration read (of a mapped checkpoint) are not needed again
        self.backend.release_host_memory(sorted(module_ranges(self.model.get_input_embeddings())))
        self.precision = Precision.of(self.model, self.backend, forwards=bool(inputs))
        self.inputs, self.kwargs = inputs, self.precision.cast(kwargs)
        sizes = [shape[0] for shape in batch_shapes(inputs)]  # kept layer to layer
        # the error is measured on the leading batches that cover ``error_windows`` windows
        want = self.options.error_windows
        before = list(itertools.accumulate(sizes, initial=0))[:-1]  # windows before each batch
        self.n_error = len(sizes) if want is None else sum(seen < want for seen in before)
        self.windows = sum(sizes[:self.n_error])
        self.here = self.backend.device  # where the batches are

    def _layers(self) -> None:
        layers = self.adapter.decoder_layers()
        devices = layer_devices(layers, self.backend)  # one device: all the backend's
        writer = self.options.writer
        with Steps(f"{self.quantizer.name} layers", len(layers), self.options.progress) as steps:
            for index, layer in enumerate(layers):
                name = self.adapter.layer_prefix(index)
                self._follow(devices[index])
                saved = writer.finished(name) if writer is not None else None
                if saved is not None:
                    self._resume(layer, name, saved)
                    steps.skip(1)
                    continue
                report = self._quantize(index, name, layer)
                steps.advance(info=f"{name}: relative MSE {report.relative_mse:.3e} "
                                   f"({report.seconds:.1f}s)")

    def _follow(self, device: torch.device) -> None:
        """The batches and keyword arguments on ``device`` (the next layer's), if not there."""
        if device == self.here:
            return
        self.inputs = self.inputs.to(device) if isinstance(self.inputs, DiskActivations) \
            else [send_to_device(x, device) for x in self.inputs]
        self.kwargs = send_to_device(self.kwargs, device)
        self.here = device

    def _resume(self, layer: nn.Module, name: str, saved: dict[str, Any]) -> None:
        """A layer an earlier run finished: recompute the next layer's inputs only."""
        if self.need_q:
            self.options.writer.restore(self.model, name, self.options.modules)
        elif self.options.source is not None:
            self.options.source(f"{name}.", layer)
        host = module_ranges(layer)
        self.precision.enter(layer, self.here)
        outputs = self.new_batches()
        with cached_dequantization():
            for x, kw in zip(self.precision.cast(self.inputs), self.kwargs, strict=True):
                outputs.append(hidden_of(layer(x, **kw)))
        layer.to("meta")  # drop its tensors: they are saved, or in the checkpoint
        self.backend.release_host_memory(sorted(host))
        self.inputs = self.precision.store(outputs)
        self.report.layers.append(LayerReport.model_validate(saved))
        log.info("%s: finished by an earlier run, outputs recomputed", name)

    def _quantize(self, index: int, name: str, layer: nn.Module) -> LayerReport:
        t0 = time.perf_counter()
        if self.options.source is not None:
            self.options.source(f"{name}.", layer)
        host_before = module_ranges(layer)
        self.precision.enter(layer, self.here)
        self.inputs = self.precision.cast(self.inputs)
        ctx = LayerContext(index=index, name=name, layer=layer, inputs=self.inputs,
                           kwargs=self.kwargs, adapter=self.adapter, scheme=self.quantizer.scheme,
                           backend=self.backend, plugins=self.options.plugins, device=self.here)
        with cached_dequantization():  # the layer runs several times; dequantize once
            self._float_pass(ctx)
            stats = self.quantizer.quantize_layer(ctx) or {}
            q_outputs = self._quantized_outputs(ctx)
        if not all_finite(q_outputs):
            raise NonFiniteError(nonfinite_cause(name, self.quantizer.name, layer,
                                                 self.inputs, ctx.reference_outputs))
        error = relative_mse(ctx.reference_outputs[:self.n_error], q_outputs) \
            if self.n_error else math.nan
        self.inputs = q_outputs if self.need_q else self.precision.store(ctx.fp_outputs)
        del ctx, q_outputs
        self.precision.restore(layer)
        layer.to(self.backend.offload_device)
        report = LayerReport(index=index, name=name, method=self.quantizer.name, relative_mse=error,
                             seconds=time.perf_counter() - t0, error_windows=self.windows,
                             stats=stats)
        if self.options.writer is not None:  # streaming: written, then dropped
            self.options.writer.write(name, layer, report.model_dump(mode="json"))
            layer.to("meta")
        self.backend.release_host_memory(sorted(host_before - module_ranges(layer)))
        self.backend.synchronize()
        self.backend.empty_cache()
        self.report.layers.append(report)
        if self.options.plugins is not None:
            self.options.plugins.hook.qcore_layer_quantized(report=report)
        log.info("%s: relative MSE %.3e (%.1fs)", name, error, report.seconds)
        return report

    def _float_pass(self, ctx: LayerContext) -> None:
        """The float layer's outputs (every batch's when needed, else the error windows'),
        with the quantizer's statistics hooks on when it has any (every batch then runs)."""
        hooks = self.quantizer.float_pass_hooks(ctx)
        keep = None if self.all_fp else self.n_error
        ctx.reference_outputs = ctx.forward(hooks, batches=None if hooks else keep, keep_first=keep,
                                            into=self.new_batches() if self.all_fp else [])

    def _quantized_outputs(self, ctx: LayerContext) -> Batches:
        """The quantized layer's outputs (every batch's under quantized propagation, else
        the error windows'), in the storage dtype; the quantizer's own when it kept them."""
        q_outputs = self.new_batches() if self.need_q else []
        keep = None if self.need_q else self.n_error
        if ctx.quantized_outputs is None:
            ctx.forward(batches=keep, out_dtype=self.precision.storage, into=q_outputs)
        else:
            for y in ctx.quantized_outputs[:keep]:
                q_outputs.append(y.to(self.precision.storage))
            ctx.quantized_outputs = None
        return q_outputs


class GroupSizeMismatch(ValueError):
    """A weight group size that does not divide some quantized layers' input features;
    ``where`` names them, ``fits`` is the largest power of two below it that divides all."""

    def __init__(self, message: str, where: str, fits: int) -> None:
        super().__init__(message)
        self.where, self.fits = where, fits


def check_group_size(model: nn.Module, adapter: ArchitectureAdapter, scheme: QuantScheme) -> None:
    """Fail (:class:`GroupSizeMismatch`) before any work if the weight group size does not
    divide a layer's inputs."""
    g = scheme.weights.group_size
    if scheme.weights.granularity != "group" or g is None:
        return
    bad: dict[str, list[str]] = {}
    common = 0
    for i, layer in enumerate(adapter.decoder_layers()):
        for name in adapter.linear_names():
            in_features = layer.get_submodule(name).in_features
            common = math.gcd(common, in_features)
            if in_features % g:
                bad.setdefault(f"{name} ({in_features})", []).append(str(i))
    if bad:
        where = "; ".join(f"{adapter.layer_prefix(int(ids[0])).rsplit('.', 1)[0]}."
                          f"{{{ids[0]}..{ids[-1]}}}.{name}" for name, ids in bad.items())
        fits = 1
        while fits * 2 <= g and common % (fits * 2) == 0:
            fits *= 2
        raise GroupSizeMismatch(
            f"`group_size` {g} does not divide the input features of: {where}. The largest "
            f"power of two below it that divides every layer is {fits}: pass `group_size` "
            f"{fits}.", where, fits)
