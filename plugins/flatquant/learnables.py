"""FlatQuant's learnables (Sun et al., 2024) and the maths that applies them in training.

Per decoder layer (Llama/Qwen2 layout) the method learns

* ``P_ln = P1 (x) P2`` with a per-channel scale ``c``: input of q/k/v (``x diag(c) P_ln``),
* ``P_up`` with a scale: input of gate/up,
* ``P_down`` with a scale: input of down,
* ``P_o`` (num_heads x num_heads) mixing heads before o_proj and ``P_v`` (head_dim) on the
  value outputs of v_proj (folded into v_proj's rows; both inverses fold into o_proj),
* ``P_k`` (head_dim) on keys after RoPE, ``P_k^-T`` on queries, for KV-cache schemes,
* learnable weight clipping (two sigmoid factors per output row) and learnable activation
  clipping (two sigmoid factors per linear),

all held by :class:`LayerTransforms`, which asks its :mod:`qcore_flatquant.variant` what
differs under ``ascend``. The fake quantizers have straight-through gradients; with
``fuse`` their elementwise chains run compiled by torch.compile (:func:`fused`), falling
back to eager PyTorch when compiling fails (:class:`CompileFallback`).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from qcore.quant.qparams import fake_quantize_minmax
from qcore.schemes import QuantArgs
from qcore_flatquant.config import FlatQuantConfig
from qcore_flatquant.transforms import decompose_dim, kron_matmul, random_orthogonal
from qcore_flatquant.variant import variant_for

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- fake quant (STE)
def fake_quant_tokens_ste(x: torch.Tensor, args: QuantArgs, clip_min: torch.Tensor | float,
                          clip_max: torch.Tensor | float, clamp: bool = True) -> torch.Tensor:
    """Per-token min/max fake quantization with the learned clip factors.

    Symmetric with ``clamp``: values are clamped to [-a, a] first (a = the larger clipped
    magnitude), so a clipped negative value maps to code -(2^(b-1) - 1) as in qcore's
    deployed path (the online transform clamps, qcore quantizes); the reference lets it
    reach -2^(b-1). Without (the ascend variant), it does: the scale is ``clip * max|x| /
    (2^(b-1) - 1)`` and codes saturate at [-2^(b-1), 2^(b-1) - 1], as the per-linear ``clip_ratio``
    of the deployed activation quantizer and the NPU's npu_kronecker_quant compute."""
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0) * clip_min
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0) * clip_max
    if args.symmetric and clamp:
        a = torch.maximum(-xmin, xmax)
        x = torch.maximum(torch.minimum(x, a), -a)
    return fake_quantize_minmax(x, xmin, xmax, args.bits, args.symmetric, ste=True)


def clip_rows(w: torch.Tensor, max_logit: torch.Tensor, min_logit: torch.Tensor
              ) -> torch.Tensor:
    """Learnable weight clipping: each row clamped to ``[sigmoid(min_logit) * min(row),
    sigmoid(max_logit) * max(row)]``."""
    wmax = w.amax(dim=1, keepdim=True) * torch.sigmoid(max_logit).to(w.dtype)
    wmin = w.amin(dim=1, keepdim=True) * torch.sigmoid(min_logit).to(w.dtype)
    return torch.maximum(torch.minimum(w, wmax), wmin)


@functools.cache
def fused(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``fn`` compiled by torch.compile (once per process; shapes are specialised, a new
    shape compiles once more). The elementwise chains of the fake quantizers (range, scale,
    round with its straight-through gradient, clamp) become one fused loop each way."""
    return torch.compile(fn, dynamic=False)


class CompileFallback:
    """What a run remembers of torch.compile failing under the default ``fuse`` (no C++
    compiler, say): the first failure, warned about once, after which the run's layers
    train eagerly instead of failing again on every layer. The quantizer keeps one per run
    and hands it to each layer's :class:`LayerTransforms`."""

    def __init__(self) -> None:
        self.failure: str | None = None

    def record(self, err: Exception) -> None:
        self.failure = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        log.warning("flatquant: torch.compile failed (%s); training with eager PyTorch "
                    "from here on (set fuse=false to skip the attempt)", self.failure)


# ----------------------------------------------------------------------------- learnables
def _init_matrix(n: int, kind: str, gen: torch.Generator) -> torch.Tensor:
    if kind == "identity":
        return torch.eye(n, dtype=torch.float64)
    return random_orthogonal(n, gen)


def _inv_t(m: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``m^-T`` computed in float64 (differentiable), returned in ``dtype``."""
    return torch.linalg.inv(m.double()).t().to(dtype)


class _Kron(nn.Module):
    """A trainable ``diag(c) (P1 (x) P2)``."""

    def __init__(self, n: int, init: str, gen: torch.Generator, diag: bool) -> None:
        super().__init__()
        n1, n2 = decompose_dim(n)
        self.left = nn.Parameter(_init_matrix(n1, init, gen).float())
        self.right = nn.Parameter(_init_matrix(n2, init, gen).float())
        self.diag = nn.Parameter(torch.ones(n)) if diag else None

    def mats(self, dtype: torch.dtype) -> dict[str, torch.Tensor | None]:
        return {"L": self.left.to(dtype), "R": self.right.to(dtype),
                "Li": _inv_t(self.left, dtype), "Ri": _inv_t(self.right, dtype),
                "c": None if self.diag is None else self.diag.to(dtype)}


class _Single(nn.Module):
    """A trainable full ``n x n`` matrix (the head, value and key transforms)."""

    def __init__(self, n: int, init: str, gen: torch.Generator) -> None:
        super().__init__()
        self.matrix = nn.Parameter(_init_matrix(n, init, gen).float())

    def mats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return self.matrix.to(dtype), _inv_t(self.matrix, dtype)


def _key(name: str) -> str:
    return name.replace(".", "__")


class LayerTransforms(nn.Module):
    """Every learnable of one decoder layer and the maths that applies them.

    ``names`` maps the roles q, k, v, o, gate, up, down to linear names in the layer;
    ``variant`` (from the config, once) says what differs under ``ascend``."""

    def __init__(self, layer: nn.Module, names: dict[str, str], num_heads: int, head_dim: int,
                 num_kv_heads: int, config: FlatQuantConfig, with_key: bool,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.names = names
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.config = config
        self.variant = variant_for(config)
        hidden = layer.get_submodule(names["q"]).in_features
        inter = layer.get_submodule(names["down"]).in_features
        init = config.init
        self.ln = _Kron(hidden, init, gen, config.add_diag)
        self.up = _Kron(hidden, init, gen, config.add_diag)
        self.down = _Kron(inter, init, gen, config.add_diag)
        heads = self.variant.head_transforms  # else o_proj keeps no transform
        self.o = _Single(num_heads, init, gen) if heads else None
        self.v = _Single(head_dim, init, gen) if heads else None
        self.k = _Single(head_dim, init, gen) if with_key else None
        self.wclip_max = nn.ParameterDict()
        self.wclip_min = nn.ParameterDict()
        self.aclip_max = nn.ParameterDict()
        self.aclip_min = nn.ParameterDict()
        for name in names.values():
            rows = layer.get_submodule(name).out_features
            self.wclip_max[_key(name)] = nn.Parameter(torch.full((rows, 1), config.clip_init))
            self.wclip_min[_key(name)] = nn.Parameter(torch.full((rows, 1), config.clip_init))
            self.aclip_max[_key(name)] = nn.Parameter(torch.full((), config.clip_init))
            self.aclip_min[_key(name)] = nn.Parameter(torch.full((), config.clip_init))
        self.role = {name: role for role, name in names.items()}
        self.clear_cache()  # no cached matrices or transformed inputs yet
        self.fuse = bool(config.fuse)  # the quantizer resolves None for the device
        self.fallback = CompileFallback()  # the quantizer's, shared by a run's layers

    def call(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``fn(*args, **kwargs)``, fused by torch.compile when ``fuse`` is on. Under the
        default (``fuse`` unset) a compiler failure falls back to eager PyTorch, recorded in
        :attr:`fallback`; asked for explicitly (``fuse=true``), it raises. Compiled variants
        are per shape, dtype and grad mode (8 at most per function: torch's recompile
        limit), which covers a decoder layer's four weight shapes, trained and evaluated."""
        if not self.fuse or args[0].dtype == torch.float64:  # float64: the one-off folding
            return fn(*args, **kwargs)
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError

        try:
            return fused(fn)(*args, **kwargs)
        except (TorchDynamoException, InductorError) as err:
            if self.config.fuse:
                raise
            self.fallback.record(err)
            self.fuse = False
            return fn(*args, **kwargs)

    # --------------------------------------------------------------- parameter groups
    def transform_parameters(self) -> list[nn.Parameter]:
        mods = [self.ln, self.up, self.down, self.o, self.v, self.k]
        return [p for m in mods if m is not None for p in m.parameters()]

    def clip_parameters(self, lwc: bool, lac: bool) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        if lwc:
            out += list(self.wclip_max.values()) + list(self.wclip_min.values())
        if lac:
            owners = [_key(n) for n in self.names.values() if self.clip_owner(n) == n]
            out += self.variant.act_clip_parameters([self.aclip_max[k] for k in owners],
                                                    [self.aclip_min[k] for k in owners])
        return out

    @torch.no_grad()
    def init_diag(self, layer: nn.Module, absmax: dict[str, torch.Tensor]) -> None:
        """SmoothQuant-style init (alpha 0.3): c = max|W_col|^(1-a) / max|X|^a, clamp 1e-5."""
        a = self.config.diag_alpha
        n = self.names
        for kron, linears, src in ((self.ln, ("q", "k", "v"), "q"),
                                   (self.up, ("gate", "up"), "gate"),
                                   (self.down, ("down",), "down")):
            if kron.diag is None:
                continue
            w = torch.cat([layer.get_submodule(n[r]).weight.detach().float() for r in linears])
            wmax = w.abs().amax(dim=0)
            xmax = absmax[n[src]].float().clamp(min=1e-5)
            kron.diag.copy_((wmax.pow(1 - a) / xmax.pow(a)).clamp(min=1e-5).to(kron.diag))

    # --------------------------------------------------------------- maths
    def cached_mats(self) -> dict[str, Any]:
        """float32 matrices and inverses, computed once per layer forward (the cache is
        cleared by a forward pre-hook that ``training.training_layer`` installs)."""
        if self._mats is None:
            self._mats = self.mats(torch.float32)
        return self._mats

    def clear_cache(self, *_: Any) -> None:
        self._mats: dict[str, Any] | None = None
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def shared_input(self, role: str, x: torch.Tensor, m: dict[str, Any]) -> torch.Tensor:
        """:meth:`transform_input` of ``x`` in float32, computed once for the linears that
        read the same tensor (q/k/v, gate/up) during one layer forward."""
        group = "o" if role == "o" else self.group(role)
        hit = self._inputs.get(group)
        if hit is not None and hit[0] is x:  # the same tensor object, kept alive by the entry
            return hit[1]
        out = self.transform_input(role, x.float(), m)
        self._inputs[group] = (x, out)
        return out

    def mats(self, dtype: torch.dtype) -> dict[str, Any]:
        m: dict[str, Any] = {"ln": self.ln.mats(dtype), "up": self.up.mats(dtype),
                             "down": self.down.mats(dtype)}
        if self.o is not None and self.v is not None:
            m["o"], m["o_it"] = self.o.mats(dtype)
            m["v"], m["v_it"] = self.v.mats(dtype)
        if self.k is not None:
            m["k"], m["k_it"] = self.k.mats(dtype)
        return m

    def group(self, role: str) -> str:
        return {"q": "ln", "k": "ln", "v": "ln", "gate": "up", "up": "up", "down": "down"}[role]

    def transform_input(self, role: str, x: torch.Tensor, m: dict[str, Any]) -> torch.Tensor:
        """The online transform, with the per-channel scale still separate."""
        if role == "o":
            return x if self.o is None else kron_matmul(x, m["o"], None)
        g = m[self.group(role)]
        if g["c"] is not None:
            x = x * g["c"]
        return kron_matmul(x, g["L"], g["R"])

    def transform_weight(self, role: str, name: str, w: torch.Tensor, b: torch.Tensor | None,
                         m: dict[str, Any], clip: bool
                         ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``W diag(1/c) P^-T``, then learned row clipping, then (v_proj) the value transform
        on the output rows."""
        if role == "o":
            if self.o is not None:
                w = kron_matmul(w, m["o_it"], m["v_it"])
        else:
            g = m[self.group(role)]
            if g["c"] is not None:
                w = w / g["c"]
            w = kron_matmul(w, g["Li"], g["Ri"])
        if clip and self.config.lwc:
            k = _key(name)
            w = self.call(clip_rows, w, self.wclip_max[k], self.wclip_min[k])
        if role == "v" and self.v is not None:
            hd = self.head_dim
            w = torch.matmul(m["v"].t(), w.reshape(-1, hd, w.shape[1])).reshape(w.shape)
            if b is not None:
                b = torch.matmul(b.reshape(-1, hd), m["v"]).reshape(b.shape)
        return w, b

    def clip_owner(self, name: str) -> str:
        """The linear whose activation clip ``name`` uses (the variant's choice)."""
        return self.variant.clip_owner(self.names, self.role[name], name)

    def act_clip(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) activation clip factors of linear ``name`` (ones without ``lac``)."""
        k = _key(self.clip_owner(name))
        if not self.config.lac:
            one = torch.ones((), device=self.aclip_min[k].device)
            return one, one
        return self.variant.act_clip(self.aclip_min[k], self.aclip_max[k])
