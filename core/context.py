"""What a quantizer works through, the other half of its contract
(:class:`qcore.interfaces.Quantizer`): the engine hands ``Quantizer.quantize_layer`` one
:class:`LayerContext` per decoder layer (the layer on the backend's device with its
calibration inputs); :class:`AbsmaxObserver` collects activation ranges."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from qcore.hostmemory import module_ranges
from qcore.interfaces import Backend, WeightSolver
from qcore.models.adapter import ArchitectureAdapter
from qcore.quant.hessian import HessianAccumulator
from qcore.quant.linear import QuantLinear, replace_module
from qcore.schemes import QuantArgs, QuantScheme

log = logging.getLogger("qcore.engine.pipeline")

HookFn = Callable[[str, nn.Module, torch.Tensor, torch.Tensor], None]
#: one layer's activations, a batch per entry: a list in memory, or a sequence offloaded to
#: disk (:class:`qcore.engine.activations.DiskActivations`) that also appends
Batches = Sequence[torch.Tensor]


def hidden_of(out: Any) -> torch.Tensor:
    """The hidden states of a decoder layer's (or submodule's) output."""
    return out[0] if isinstance(out, (tuple, list)) else out


def batch_shapes(batches: Sequence[torch.Tensor]) -> list[tuple[int, ...]]:
    """Each batch's shape, without reading offloaded batches from disk."""
    if not isinstance(batches, list):  # offloaded: it knows its shapes
        return batches.shapes()
    return [tuple(x.shape) for x in batches]


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
        return not isinstance(self.inputs, list)

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
    def forward(self, hooks: dict[str, HookFn] | None = None, keep_outputs: bool = True,
                inputs: Sequence[torch.Tensor] | None = None, batches: int | None = None,
                out_dtype: torch.dtype | None = None, keep_first: int | None = None,
                into: Batches | None = None) -> Batches:
        """Run every cached batch (or the first ``batches``) through the layer;
        ``hooks[name](name, module, x, y)`` sees the input and output of submodule ``name`` for each
        batch. ``out_dtype``: keep the outputs in it (cast batch by batch); ``keep_first``: keep
        only the first that many; ``into``: append them there (a new list by default)."""
        handles = []
        for name, fn in (hooks or {}).items():
            module = self.layer.get_submodule(name)

            def hook(mod: nn.Module, args: tuple, kwargs: dict, out: Any, _n: str = name,
                     _fn: HookFn = fn):
                x = args[0] if args else kwargs["hidden_states"]  # attention is called by kw
                _fn(_n, mod, x, hidden_of(out))

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
                y = hidden_of(self.layer(x, **kw))
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

    def solve_linears(self, solver: WeightSolver, floats: dict[str, nn.Linear], weights: QuantArgs,
                      activations: QuantArgs | dict[str, QuantArgs | None] | None = None,
                      transforms: dict[str, nn.Module] | None = None) -> dict[str, float]:
        """Round each linear of ``floats`` (name -> the float weights to round) with ``solver`` and
        put a QuantLinear in its place (with its online transform from ``transforms``, which
        implements ``spec()``; its activation quantizer from ``activations``, one for all or one per
        name; static activation scales from the inputs' max |x|). A solver that needs Hessians gets
        them group by group in the adapter's sequential order, the earlier groups already replaced
        (true-sequential), from what each module in place really multiplies. Returns the solver's
        statistics as ``"<solver>.<linear>.<stat>"``."""
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
                q = QuantLinear.from_solved(linear, solved, weights, activations=per_name[name],
                                            input_transform=transforms.get(name))
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
