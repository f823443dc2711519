"""The layer-wise calibration loop every quantizer runs in.

1. Run the model on the calibration windows until the first decoder layer and keep its
   inputs (hidden states plus the keyword arguments the model passes: position
   embeddings, masks).
2. For each decoder layer: move it to the backend's device, compute its full-precision
   outputs (on every batch when the quantizer or full-precision propagation needs them,
   else only on the first ``error_windows`` windows, where the error is measured), let the
   quantizer transform and quantize it (collecting statistics through forward hooks via
   :class:`LayerContext`), compute the quantized outputs and the relative reconstruction
   error, pick the next layer's inputs (quantized outputs by default, full-precision ones
   on request), move the layer back, let the backend release the host memory of the
   float tensors the layer no longer holds, fire the event hook.

Only one decoder layer and the activation cache live on the device at a time.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn

from qcore.activations import ActivationPlan, DiskActivations, plan_activations
from qcore.errors import NonFiniteError
from qcore.finite import all_finite, nonfinite_tensors
from qcore.hostmemory import module_ranges
from qcore.interfaces import Backend, LayerWriter, Quantizer, WeightSolver
from qcore.models.adapter import ArchitectureAdapter
from qcore.models.streaming import release_layer
from qcore.placement import layer_devices, to_device
from qcore.quant.gptq import HessianAccumulator
from qcore.quant.kvcache import KVCacheQuantizer
from qcore.quant.linear import QuantLinear, cached_dequantization, replace_module
from qcore.reports import LayerReport, QuantizationReport
from qcore.schemes import QuantArgs, QuantScheme

log = logging.getLogger(__name__)

HookFn = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]
#: one layer's activations, a batch per entry: in memory, or offloaded to disk
Batches = list[torch.Tensor] | DiskActivations
#: fills a decoder layer's float tensors (named prefix + local name) from a checkpoint
LayerSource = Callable[[str, nn.Module], None]


class _StopForward(Exception):
    pass


def _hidden(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


@contextmanager
def _non_layer_modules_on(model: nn.Module, adapter: ArchitectureAdapter, device: torch.device
                          ) -> Iterator[None]:
    """Move everything except the decoder layers to ``device`` for the duration."""
    layers = adapter.decoder_layers()
    inside = {id(m) for m in layers.modules()}
    moved: list[nn.Module] = []
    for module in model.modules():
        if id(module) in inside:
            continue
        if any(p.device != device for p in module.parameters(recurse=False)) or any(
            b.device != device for b in module.buffers(recurse=False)
        ):
            for p in module.parameters(recurse=False):
                p.data = p.data.to(device)
            for name, b in module.named_buffers(recurse=False):
                setattr(module, name, b.to(device))
            moved.append(module)
    try:
        yield
    finally:
        if moved and device.type != "cpu":
            for module in moved:
                for p in module.parameters(recurse=False):
                    p.data = p.data.to("cpu")
                for name, b in module.named_buffers(recurse=False):
                    setattr(module, name, b.to("cpu"))


@torch.no_grad()
def capture_first_layer_inputs(
    model: nn.Module,
    adapter: ArchitectureAdapter,
    input_ids: torch.Tensor,
    backend: Backend,
    batch_size: int,
    into: Batches | None = None,
) -> tuple[Batches, list[dict[str, Any]]]:
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


@dataclass
class LayerContext:
    """What a quantizer sees of one decoder layer (on the backend's device)."""

    index: int
    name: str
    layer: nn.Module
    #: the layer's inputs, one batch per entry; a sequence read from disk when the run's
    #: activations exceed its budget (index, slice or iterate it; ``list()`` to hold all)
    inputs: Sequence[torch.Tensor]
    kwargs: list[dict[str, Any]]
    adapter: ArchitectureAdapter
    scheme: QuantScheme
    backend: Backend
    plugins: Any = None
    #: where the layer runs: the backend's device, or its share of several devices
    device: torch.device | None = None
    log: logging.Logger = field(default_factory=lambda: log)
    #: the float layer's outputs on the first len(reference_outputs) batches
    reference_outputs: Sequence[torch.Tensor] = field(default_factory=list)
    #: the quantized layer's outputs on every batch, when the quantizer assembled them
    #: along the way (the pipeline then skips its own forward of the quantized layer);
    #: they must be what that forward gives
    quantized_outputs: list[torch.Tensor] | None = None

    def __post_init__(self) -> None:
        if self.device is None:
            self.device = self.backend.device

    @property
    def offloaded(self) -> bool:
        """Whether the inputs live on disk (the run's activations exceed its budget): a
        quantizer should then keep no copy of them in memory."""
        return isinstance(self.inputs, DiskActivations)

    def batch_shapes(self) -> list[tuple[int, ...]]:
        """Each input batch's shape (without reading offloaded batches from disk)."""
        return batch_shapes(self.inputs)

    def batch_tokens(self) -> list[int]:
        """Tokens (windows x positions) of each input batch."""
        return [math.prod(shape[:-1]) for shape in self.batch_shapes()]

    @property
    def fp_outputs(self) -> Sequence[torch.Tensor]:
        """The float layer's outputs on every calibration batch."""
        if len(self.reference_outputs) != len(self.inputs):
            raise RuntimeError(
                f"{self.name}: the pipeline computed full-precision outputs for "
                f"{len(self.reference_outputs)} of {len(self.inputs)} batches; a quantizer "
                f"that reads ctx.fp_outputs declares needs_fp_outputs = True")
        return self.reference_outputs

    @torch.no_grad()
    def forward(
        self,
        hooks: dict[str, HookFn] | None = None,
        keep_outputs: bool = True,
        inputs: Sequence[torch.Tensor] | None = None,
        batches: int | None = None,
        out_dtype: torch.dtype | None = None,
        keep_first: int | None = None,
        into: Batches | None = None,
    ) -> Batches:
        """Run every cached batch (or the first ``batches``) through the layer;
        ``hooks[name](name, module, x, y)`` sees the input and output of submodule ``name``
        for each batch. ``out_dtype``: keep the outputs in it (cast batch by batch);
        ``keep_first``: keep only the first that many; ``into``: append them there (a new
        list by default)."""
        handles = []
        for name, fn in (hooks or {}).items():
            module = self.layer.get_submodule(name)

            def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, _n: str = name,
                     _fn: HookFn = fn):
                x = args[0] if args else kwargs["hidden_states"]  # attention is called by kw
                _fn(_n, mod, x, _hidden(out))

            handles.append(module.register_forward_hook(hook, with_kwargs=True))
        outputs: Batches = [] if into is None else into
        try:
            source = inputs if inputs is not None else self.inputs
            n = len(source) if batches is None else min(batches, len(source))
            if len(self.kwargs) != len(source):
                raise ValueError(f"{len(source)} input batches but {len(self.kwargs)} "
                                 "keyword-argument batches")
            for b in range(n):
                x, kw = source[b], self.kwargs[b]
                y = _hidden(self.layer(x, **kw))
                if keep_outputs and (keep_first is None or len(outputs) < keep_first):
                    outputs.append(y if out_dtype is None else y.to(out_dtype))
        finally:
            for h in handles:
                h.remove()
        return outputs

    def submodule(self, name: str) -> nn.Module:
        return self.layer.get_submodule(name)

    def replace(self, name: str, module: nn.Module) -> nn.Module:
        """Put ``module`` in place of submodule ``name``; the host memory of the replaced
        module's tensors (pages of a memory-mapped checkpoint) is released right away."""
        old = replace_module(self.layer, name, module)
        self.backend.release_host_memory(sorted(module_ranges(old)))
        return old

    def hessians(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``2/N sum x x^T`` of each named linear's input over every calibration token, in
        one forward pass. For a QuantLinear the input is what it really multiplies
        (``quantize_input``: online transform, then activation fake quantization)."""
        acc: dict[str, HessianAccumulator] = {}

        def observe(name: str, module: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> None:
            if isinstance(module, QuantLinear):
                x = module.quantize_input(x)
            if name not in acc:
                acc[name] = HessianAccumulator(x.shape[-1], x.device)
            acc[name].add(x)

        self.forward({n: observe for n in names}, keep_outputs=False)
        return {n: acc[n].H for n in names}

    def solve_linears(self, solver: WeightSolver, floats: dict[str, nn.Linear],
                      weights: QuantArgs,
                      activations: QuantArgs | dict[str, QuantArgs | None] | None = None,
                      transforms: dict[str, tuple[nn.Module, Any]] | None = None
                      ) -> dict[str, float]:
        """Round each linear of ``floats`` (name -> the float weights to round) with
        ``solver`` and put a QuantLinear in its place (with its online transform and spec
        from ``transforms``; its activation quantizer from ``activations``, one for all or
        one per name; static activation scales from the inputs' max |x|). A solver
        that needs Hessians gets them group by group in the
        adapter's sequential order, the earlier groups already replaced (true-sequential),
        from what each module in place really multiplies. Returns the solver's statistics
        as ``"<solver>.<linear>.<stat>"``."""
        transforms = transforms or {}
        if solver.needs_hessian:
            groups = [[n for n in g if n in floats] for g in self.adapter.sequential_groups()]
            groups = [g for g in groups if g]
            grouped = {n for g in groups for n in g}
            rest = [n for n in floats if n not in grouped]
            groups += [rest] if rest else []
        else:
            groups = [list(floats)]
        per_name = activations if isinstance(activations, dict) else \
            dict.fromkeys(floats, activations)
        missing = [n for n in floats if n not in per_name]
        if missing:
            raise ValueError(f"{self.name}: no activation quantizer given for {missing}")
        static = {n for n, a in per_name.items() if a is not None and not a.dynamic}
        stats: dict[str, float] = {}
        for group in groups:
            hessians = self.hessians(group) if solver.needs_hessian else {}
            absmax = self.input_absmax([n for n in group if n in static]) \
                if static & set(group) else {}
            for name in group:
                linear = floats[name]
                solved = solver.solve(linear.weight, weights, hessians.get(name), self.backend,
                                      f"{self.name}.{name}")
                transform, spec = transforms.get(name, (None, None))
                q = QuantLinear.from_solved(linear, solved, weights,
                                            activations=per_name[name],
                                            input_transform=transform, transform_spec=spec)
                if name in absmax:  # static activations: the float inputs' range to start
                    m = absmax[name].max()
                    q.set_input_range(-m, m)
                self.replace(name, q)
                stats.update({f"{solver.name}.{name}.{k}": v for k, v in solved.stats.items()})
            del hessians
        return stats

    def input_absmax(self, names: list[str]) -> dict[str, torch.Tensor]:
        """max |x| per input channel of each named submodule over all calibration tokens."""
        observer = AbsmaxObserver(names)
        self.forward(observer.hooks(), keep_outputs=False)
        return observer.absmax


class AbsmaxObserver:
    """max |x| per input channel of the hooked submodules over every token seen: hooks for
    :meth:`LayerContext.forward` or for the pipeline's float pass
    (``Quantizer.float_pass_hooks``)."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.absmax: dict[str, torch.Tensor] = {}

    def hooks(self) -> dict[str, HookFn]:
        return {n: self._observe for n in self.names}

    def _observe(self, name: str, _m: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> None:
        cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
        prev = self.absmax.get(name)
        self.absmax[name] = cur if prev is None else torch.maximum(prev, cur)


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
        """``forwards``: whether any batch will run through the layers; without, a
        float32 copy of each layer would only cost memory (RTN weight-only rounds the
        same codes from either)."""
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
        """A finished layer's float tensors back in the storage dtype, except what a
        quantized linear computed in float32 on purpose (scales, static activation
        parameters, online transforms) and KV-cache quantizers; a QuantLinear's bias
        follows the model."""
        if self.work == self.storage:
            return
        if isinstance(module, QuantLinear):
            if module.bias is not None:
                module.bias.data = module.bias.data.to(self.storage)
            return
        if isinstance(module, KVCacheQuantizer):
            return
        for p in module.parameters(recurse=False):
            if p.is_floating_point():
                p.data = p.data.to(self.storage)
        for name, b in module.named_buffers(recurse=False):
            if b is not None and b.is_floating_point():
                setattr(module, name, b.to(self.storage))
        for child in module.children():
            self.restore(child)


@torch.no_grad()
def _replay(layer: nn.Module, backend: Backend, device: torch.device, precision: Precision,
            inputs: Batches, kwargs: list[dict[str, Any]], outputs: Batches) -> Batches:
    """A finished layer's outputs on every batch, appended to ``outputs``; the layer is
    dropped afterwards."""
    host = module_ranges(layer)
    precision.enter(layer, device)
    with cached_dequantization():
        for x, kw in zip(precision.cast(inputs), kwargs, strict=True):
            outputs.append(_hidden(layer(x, **kw)))
    release_layer(layer)
    backend.release_host_memory(sorted(host))
    return precision.store(outputs)


def _follow(device: torch.device, here: torch.device, inputs: Batches,
            kwargs: list[dict[str, Any]]) -> tuple[Batches, list[dict[str, Any]], torch.device]:
    """The batches and keyword arguments on ``device`` (the next layer's), if not there."""
    if device == here:
        return inputs, kwargs, here
    moved = inputs.to(device) if isinstance(inputs, DiskActivations) else \
        [to_device(x, device) for x in inputs]
    return moved, to_device(kwargs, device), device


def batch_shapes(batches: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each batch's shape, without reading offloaded batches from disk."""
    if isinstance(batches, DiskActivations):
        return batches.shapes()
    return [tuple(x.shape) for x in batches]


def _error_batches(windows_per_batch: list[int], windows: int | None) -> int:
    """How many leading batches cover at least ``windows`` windows (None: all)."""
    if windows is None:
        return len(windows_per_batch)
    if windows == 0:
        return 0
    seen = 0
    for b, n in enumerate(windows_per_batch):
        seen += n
        if seen >= windows:
            return b + 1
    return len(windows_per_batch)


def relative_mse(ref: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> float:
    """||out - ref||^2 / ||ref||^2 over the batches of ``ref`` (``out`` may have more batches)."""
    pairs = zip(ref, out[:len(ref)], strict=True)
    num = sum(float((o.float() - r.float()).pow(2).sum()) for r, o in pairs)
    den = sum(float(r.float().pow(2).sum()) for r in ref)
    return num / max(den, 1e-30)


def _nonfinite_cause(name: str, method: str, layer: nn.Module, inputs: Sequence[torch.Tensor],
                     reference: Sequence[torch.Tensor]) -> str:
    """Why a layer's quantized outputs hold NaN/inf, with advice that fits the cause."""
    where = f"{name}: the quantized layer's outputs hold NaN/inf"
    if not all_finite(inputs):
        return (f"{where} because its inputs already do (an earlier layer or the embeddings "
                "produced them)")
    if not all_finite(reference):
        dtype = next(layer.parameters()).dtype
        return (f"{where}, and so do the float layer's on the same inputs ({dtype}): the "
                "model overflows on this calibration data; run in float32")
    bad = nonfinite_tensors(layer)
    if bad:
        listed = "; ".join(f"{t}: {d}" for t, d in list(bad.items())[:3])
        return (f"{where}: {method} wrote non-finite values into {listed}. The float layer "
                f"is finite on the same inputs, so the method's solver diverged: change its "
                "options (e.g. a larger damp for gptq, a lower lr for flatquant)")
    return (f"{where} although its weights and the float layer's outputs are finite: the "
            f"activation quantization or an online transform of {method} overflowed")


def _layer_line(index: int, total: int, name: str, error: float, seconds: float) -> None:
    """Progress for a log file: one line per layer when stderr is not a terminal."""
    print(f"[{index + 1}/{total}] {name}: relative MSE {error:.3e} ({seconds:.1f}s)",
          file=sys.stderr, flush=True)


def check_group_size(model: nn.Module, adapter: ArchitectureAdapter, scheme: QuantScheme) -> None:
    """Fail before any work if the weight group size does not divide a layer's inputs."""
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
        raise ValueError(
            f"group_size {g} does not divide the input features of: {where}. "
            f"The largest power of two below it that divides every layer is {fits}: "
            f"pass --group-size {fits}."
        )


@torch.no_grad()
def run_layerwise(
    model: nn.Module,
    quantizer: Quantizer,
    adapter: ArchitectureAdapter,
    backend: Backend,
    calib_ids: torch.Tensor,
    *,
    plugins: Any = None,
    propagation: Literal["quantized", "full"] | None = None,
    batch_size: int = 4,
    error_windows: int | None = 4,
    progress: bool = True,
    source: LayerSource | None = None,
    writer: LayerWriter | None = None,
    modules: dict[str, type[nn.Module]] | None = None,
    activation_budget: int | None = None,
    offload_dir: Path | None = None,
) -> QuantizationReport:
    """Quantize ``model`` in place, one decoder layer at a time.

    ``error_windows``: calibration windows each layer's relative MSE is measured on (None:
    all). Fewer spares a full-precision layer forward on the rest unless the quantizer or
    ``propagation="full"`` needs every full-precision output anyway.

    Streaming: ``source`` fills each decoder layer from the checkpoint just before its
    turn (the layers start on the meta device); ``writer`` takes each finished layer,
    which is then dropped, so memory follows one layer. A layer the writer already holds
    from an interrupted run is not quantized again: only its outputs are recomputed (the
    saved quantized layer's, or the float layer's under full propagation), as the next
    layer's inputs; ``modules`` rebuilds its online transforms."""
    propagation = propagation or quantizer.propagation
    if error_windows is not None and error_windows < 0:
        raise ValueError(f"error_windows must be >= 0 or None, got {error_windows}")
    all_fp = propagation == "full" or quantizer.needs_fp_outputs
    started = time.perf_counter()
    backend.reset_peak_memory()
    model.eval()
    quantizer.prepare(model, adapter)
    plan = _activation_plan(model, backend, calib_ids, batch_size, all_fp,
                            activation_budget, offload_dir)
    with plan.containers(backend.device) as new_batches:
        return _run_layers(model, quantizer, adapter, backend, calib_ids, new_batches,
                           plugins=plugins, propagation=propagation, batch_size=batch_size,
                           error_windows=error_windows, progress=progress, source=source,
                           writer=writer, modules=modules, started=started)


def _activation_plan(model: nn.Module, backend: Backend, calib_ids: torch.Tensor,
                     batch_size: int, all_fp: bool, budget: int | None,
                     offload_dir: Path | None) -> ActivationPlan:
    embedding = model.get_input_embeddings()
    windows, seq_len = calib_ids.shape
    precision = Precision.of(model, backend, forwards=windows > 0)
    plan = plan_activations(windows, seq_len, embedding.weight.shape[-1], batch_size,
                            precision.storage, precision.work, all_fp, budget, offload_dir)
    (log.warning if plan.offload else log.info)("%s", plan.describe())
    return plan


def _run_layers(
    model: nn.Module,
    quantizer: Quantizer,
    adapter: ArchitectureAdapter,
    backend: Backend,
    calib_ids: torch.Tensor,
    new_batches: Callable[[], Batches],
    *,
    plugins: Any,
    propagation: Literal["quantized", "full"],
    batch_size: int,
    error_windows: int | None,
    progress: bool,
    source: LayerSource | None,
    writer: LayerWriter | None,
    modules: dict[str, type[nn.Module]] | None,
    started: float,
) -> QuantizationReport:
    """The body of :func:`run_layerwise`; ``new_batches`` makes the containers of each
    layer's activations (lists, or files when offloaded)."""
    all_fp = propagation == "full" or quantizer.needs_fp_outputs
    inputs, kwargs = capture_first_layer_inputs(model, adapter, calib_ids, backend, batch_size,
                                                into=new_batches())
    kwargs = [to_device(kw, backend.device) for kw in kwargs]
    # the embedding rows the calibration read (of a memory-mapped checkpoint) are not
    # needed again
    backend.release_host_memory(sorted(module_ranges(model.get_input_embeddings())))
    precision = Precision.of(model, backend, forwards=bool(inputs))
    work_kwargs = precision.cast(kwargs)
    sizes = [shape[0] for shape in batch_shapes(inputs)]  # kept layer to layer
    n_error = _error_batches(sizes, error_windows)
    windows = sum(sizes[:n_error])
    need_q = propagation == "quantized"
    layers = adapter.decoder_layers()
    devices = layer_devices(layers, backend)  # one device: all the backend's
    here = backend.device  # where the batches are
    report = QuantizationReport(method=quantizer.name, scheme=quantizer.scheme.model_dump())

    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    live = progress and Console(stderr=True).is_terminal
    with Progress(*columns, disable=not live, transient=False) as bar:
        task = bar.add_task(f"{quantizer.name} layers", total=len(layers), info="")
        for index, layer in enumerate(layers):
            t0 = time.perf_counter()
            name = adapter.layer_prefix(index)
            bar.update(task, info=f"{name}")
            saved = writer.finished(name) if writer is not None else None
            if saved is not None:  # resumed: recompute the next layer's inputs only
                if need_q:
                    writer.restore(model, name, modules or {})
                elif source is not None:
                    source(f"{name}.", layer)
                inputs, work_kwargs, here = _follow(devices[index], here, inputs,
                                                    work_kwargs)
                inputs = _replay(layer, backend, here, precision, inputs, work_kwargs,
                                 new_batches())
                report.layers.append(LayerReport.model_validate(saved))
                bar.update(task, advance=1, info=f"{name} (resumed)")
                log.info("%s: finished by an earlier run, outputs recomputed", name)
                continue
            if source is not None:
                source(f"{name}.", layer)
            host_before = module_ranges(layer)
            inputs, work_kwargs, here = _follow(devices[index], here, inputs, work_kwargs)
            precision.enter(layer, here)
            inputs = precision.cast(inputs)
            ctx = LayerContext(index=index, name=name, layer=layer, inputs=inputs,
                               kwargs=work_kwargs, adapter=adapter, scheme=quantizer.scheme,
                               backend=backend, plugins=plugins, device=here)
            with cached_dequantization():  # the layer runs several times; dequantize once
                hooks = quantizer.float_pass_hooks(ctx)
                fp_into = new_batches() if all_fp else []
                if hooks:  # every batch runs; the outputs kept are those needed
                    ctx.reference_outputs = ctx.forward(
                        hooks, keep_first=None if all_fp else n_error, into=fp_into)
                else:
                    ctx.reference_outputs = ctx.forward(batches=None if all_fp else n_error,
                                                        into=fp_into)
                del hooks, fp_into
                stats = quantizer.quantize_layer(ctx) or {}
                q_outputs = new_batches() if need_q else []
                if ctx.quantized_outputs is None:
                    ctx.forward(batches=None if need_q else n_error,
                                out_dtype=precision.storage, into=q_outputs)
                else:
                    for y in ctx.quantized_outputs[:None if need_q else n_error]:
                        q_outputs.append(y.to(precision.storage))
                    ctx.quantized_outputs = None
            if not all_finite(q_outputs):
                raise NonFiniteError(_nonfinite_cause(name, quantizer.name, layer, inputs,
                                                      ctx.reference_outputs))
            error = relative_mse(ctx.reference_outputs[:n_error], q_outputs) if n_error \
                else math.nan
            inputs = q_outputs if need_q else precision.store(ctx.fp_outputs)
            del ctx, q_outputs
            precision.restore(layer)
            layer.to(backend.offload_device)
            layer_report = LayerReport(index=index, name=name, method=quantizer.name,
                                       relative_mse=error, seconds=time.perf_counter() - t0,
                                       error_windows=windows,
                                       stats=stats)
            if writer is not None:
                writer.write(name, layer, layer_report.model_dump(mode="json"))
                release_layer(layer)
            backend.release_host_memory(sorted(host_before - module_ranges(layer)))
            backend.synchronize()
            backend.empty_cache()
            report.layers.append(layer_report)
            if plugins is not None:
                plugins.hook.qcore_layer_quantized(report=layer_report)
            bar.update(task, advance=1, info=f"{name} rel-mse {error:.2e}")
            if progress and not live:
                _layer_line(index, len(layers), name, error, layer_report.seconds)
            log.info("%s: relative MSE %.3e (%.1fs)", name, error, layer_report.seconds)
    quantizer.finalize(model, adapter)
    mem = backend.memory_stats()
    report.seconds = time.perf_counter() - started
    report.peak_rss_mb = mem.peak_rss_mb
    report.peak_device_mb = mem.device_peak_mb
    if plugins is not None:
        plugins.hook.qcore_model_quantized(report=report, model=model)
    return report
