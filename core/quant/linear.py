"""QuantLinear: the quantized linear layer every method produces. It holds integer codes (packed two
per byte at 4 bits or less), per-(row, group) scales and zero points, the column -> group index
``g_idx`` (so act-order permutations dequantize in place), an optional bias, optional activation
quantization (per-token dynamic or static per-tensor) and an optional online input transform (e.g.
FlatQuant's Kronecker transform). ``forward`` runs ``self.kernel`` when a backend installed a real
integer kernel, else the reference path (the oracle every backend is tested against): exact
dequantization on every call (a 4-bit model stays 4-bit in memory; :func:`cached_dequantization`
keeps each weight between calls), then a float matmul."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from qcore.quant.packing import pack_codes, packed_width, unpack_codes
from qcore.quant.qparams import (
    args_qparams,
    dequantize_weight,
    fake_quantize_activation,
    group_index,
    quantize_weight,
    weight_qparams,
)
from qcore.schemes import QuantArgs

Kernel = Callable[["QuantLinear", torch.Tensor], torch.Tensor]

#: the layers that cached their weight inside the innermost cached_dequantization()
_CACHING: ContextVar[list[QuantLinear] | None] = ContextVar("qcore_dequant_cache", default=None)


@contextmanager
def cached_dequantization() -> Iterator[None]:
    """Inside the block a QuantLinear's reference path keeps its dequantized weight between
    calls (float copies of every weight used); they are dropped when the block ends."""
    cached: list[QuantLinear] = []
    token = _CACHING.set(cached)
    try:
        yield
    finally:
        _CACHING.reset(token)
        for module in cached:
            module._dequant_cache = None


class TransformSpec(BaseModel):
    """How to rebuild an online input transform when loading a saved model."""

    model_config = ConfigDict(extra="forbid")
    type: str
    config: dict[str, Any] = {}


def build_transform(spec: TransformSpec | None, modules: dict[str, type[nn.Module]],
                    owner: str) -> nn.Module | None:
    """Rebuild a saved transform module from its spec through the registered module types
    (the ``qcore_register_modules`` hook); ``owner`` names the layer in errors."""
    if spec is None:
        return None
    if spec.type not in modules:
        raise ValueError(f"{owner} needs module type {spec.type!r}, which no installed plugin "
                         f"registers (known: {', '.join(modules) or 'none'})")
    return modules[spec.type](**spec.config)


@dataclass
class SolvedWeight:
    """What a :class:`qcore.interfaces.WeightSolver` returns for one weight matrix."""

    weight: torch.Tensor          # (out, in): the values whose nearest codes are the result
    scale: torch.Tensor           # (out, n_groups)
    zero: torch.Tensor            # (out, n_groups), integral values
    g_idx: torch.Tensor | None = None  # (in,) column -> group; None: contiguous groups
    stats: dict[str, float] = field(default_factory=dict)  # e.g. the solver's loss


class QuantLinearSpec(BaseModel):
    """Everything needed to rebuild an empty QuantLinear before loading its tensors."""

    model_config = ConfigDict(extra="forbid")
    in_features: int
    out_features: int
    bias: bool
    n_groups: int
    weights: QuantArgs
    activations: QuantArgs | None = None
    input_transform: TransformSpec | None = None


class QuantLinear(nn.Module):
    def __init__(self, spec: QuantLinearSpec, input_transform: nn.Module | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.spec = spec
        self.in_features = spec.in_features
        self.out_features = spec.out_features
        width = packed_width(spec.in_features, spec.weights.bits)
        self.register_buffer("qweight", torch.zeros(spec.out_features, width, dtype=torch.uint8))
        self.register_buffer("scales", torch.ones(spec.out_features, spec.n_groups))
        self.register_buffer("zeros",
                             torch.zeros(spec.out_features, spec.n_groups, dtype=torch.uint8))
        self.register_buffer("g_idx", torch.zeros(spec.in_features, dtype=torch.int32))
        self.bias = nn.Parameter(torch.zeros(spec.out_features, dtype=dtype), requires_grad=False) \
            if spec.bias else None
        if spec.activations is not None and not spec.activations.dynamic:
            self.register_buffer("input_scale", torch.ones(()))
            self.register_buffer("input_zero", torch.zeros(()))
        else:
            self.input_scale = self.input_zero = None
        self.input_transform = input_transform
        self.kernel: Kernel | None = None
        self._dequant_cache: torch.Tensor | None = None

    @classmethod
    def from_float(cls, linear: nn.Linear, weights: QuantArgs, *, scale: torch.Tensor | None = None,
                   zero: torch.Tensor | None = None, g_idx: torch.Tensor | None = None,
                   activations: QuantArgs | None = None, input_transform: nn.Module | None = None,
                   dtype: torch.dtype | None = None) -> QuantLinear:
        """Quantize ``linear.weight`` with given (or min/max round-to-nearest) qparams:
        ``scale``/``zero`` are (out, n_groups), ``g_idx`` maps each input column to its group. The
        weight must already hold the values the method decided on (e.g. GPTQ's updated columns);
        codes are the nearest ones under the given parameters. An ``input_transform`` must implement
        ``spec() -> TransformSpec`` (saved, to rebuild it on load)."""
        w = linear.weight.detach()
        if scale is None or zero is None:
            scale, zero = weight_qparams(w, weights)
        if g_idx is None:
            g_idx = group_index(w.shape[1], weights)
        transform_spec = input_transform.spec() if input_transform is not None else None
        spec = QuantLinearSpec(in_features=linear.in_features, out_features=linear.out_features,
                               bias=linear.bias is not None, n_groups=scale.shape[1],
                               weights=weights, activations=activations,
                               input_transform=transform_spec)
        module = cls(spec, input_transform=input_transform, dtype=dtype or w.dtype)
        codes = quantize_weight(w, scale, zero, g_idx, weights.bits)
        module.qweight = pack_codes(codes, weights.bits).to(w.device)
        module.scales = scale.float().to(w.device)
        module.zeros = zero.to(torch.uint8).to(w.device)
        module.g_idx = g_idx.to(torch.int32).to(w.device)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return module

    @classmethod
    def from_solved(cls, linear: nn.Linear, solved: SolvedWeight, weights: QuantArgs, *,
                    activations: QuantArgs | None = None, input_transform: nn.Module | None = None
                    ) -> QuantLinear:
        """The QuantLinear of a solver's result: codes nearest to ``solved.weight`` (read in
        float32: a half-precision copy could fall between two codes) under its
        scale/zero/g_idx, with ``linear``'s bias and dtype (its weight is not read)."""
        shell = nn.Linear(linear.in_features, linear.out_features, bias=False, device="meta")
        shell.weight = nn.Parameter(solved.weight.float(), requires_grad=False)
        shell.bias = linear.bias
        return cls.from_float(shell, weights, scale=solved.scale.float(), zero=solved.zero.float(),
                              g_idx=solved.g_idx, activations=activations,
                              input_transform=input_transform, dtype=linear.weight.dtype)

    def set_input_range(self, lo: torch.Tensor, hi: torch.Tensor) -> float:
        """Static per-tensor activation parameters from an observed input range ``[lo, hi]``
        (scaled by the activation clip ratio); returns the scale."""
        args = self.spec.activations
        if args is None or self.input_scale is None:
            raise ValueError("set_input_range needs static activation quantization")
        scale, zero = args_qparams(lo * args.clip_ratio, hi * args.clip_ratio, args)
        self.input_scale.copy_(scale)
        self.input_zero.copy_(zero)
        return float(scale)

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.qweight, self.spec.weights.bits, self.in_features)

    def contiguous_groups(self) -> bool:
        """Whether input column k belongs to group k // group_size (no act-order
        permutation): what formats without a ``g_idx`` can store."""
        expected = group_index(self.in_features, self.spec.weights).to(self.g_idx.dtype)
        return torch.equal(self.g_idx.cpu(), expected)

    def dequantize(self) -> torch.Tensor:
        """The exact float32 weight this layer represents."""
        return dequantize_weight(self.codes(), self.scales, self.zeros.float(), self.g_idx)

    def _reference_weight(self, dtype: torch.dtype) -> torch.Tensor:
        cache = self._dequant_cache
        if cache is not None and cache.device == self.qweight.device and cache.dtype == dtype:
            return cache
        weight = self.dequantize().to(dtype)
        caching = _CACHING.get()
        if caching is not None:
            self._dequant_cache = weight
            caching.append(self)
        return weight

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Online transform then activation fake quantization (the reference path)."""
        if self.input_transform is not None:
            x = self.input_transform(x)
        act = self.spec.activations
        if act is not None:
            x = fake_quantize_activation(x, act, self.input_scale, self.input_zero)
        return x

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quantize_input(x)
        return F.linear(x, self._reference_weight(x.dtype), self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x) if self.kernel is None else self.kernel(self, x)

    def _apply(self, fn, recurse=True):  # device/dtype moves invalidate the cache
        self._dequant_cache = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._dequant_cache = None
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        act = self.spec.activations.describe() if self.spec.activations else "none"
        kernel = getattr(self.kernel, "__name__", "reference") if self.kernel else "reference"
        return (f"in={self.in_features}, out={self.out_features}, "
                f"weights={self.spec.weights.describe()}, activations={act}, kernel={kernel}")


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule at dotted ``name`` and return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
