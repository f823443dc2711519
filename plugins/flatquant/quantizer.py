"""FlatQuant (Sun et al., 2024): learned affine transforms trained one decoder layer at a time.

Per decoder layer (Llama/Qwen2 layout) the method learns

* ``P_ln = P1 (x) P2`` with a per-channel scale ``c``: input of q/k/v (``x diag(c) P_ln``),
* ``P_up`` with a scale: input of gate/up,
* ``P_down`` with a scale: input of down,
* ``P_o`` (num_heads x num_heads) mixing heads before o_proj and ``P_v`` (head_dim) on the
  value outputs of v_proj (folded into v_proj's rows; both inverses fold into o_proj),
* ``P_k`` (head_dim) on keys after RoPE, ``P_k^-T`` on queries, for KV-cache schemes,
* learnable weight clipping (two sigmoid factors per output row) and learnable activation
  clipping (two sigmoid factors per linear),

by minimising the MSE between the fake-quantized layer and the full-precision layer output
with AdamW and a cosine schedule. Afterwards the inverse transforms, clipping and scales are
folded in float64 and the weights are quantized to QuantLinear codes; the Kronecker
transforms stay online as each QuantLinear's ``input_transform``.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore import api
from qcore.errors import NonFiniteError
from qcore.interfaces import Quantizer, UnsupportedScheme, WeightSolver
from qcore.pipeline import LayerContext
from qcore.quant.kvcache import (
    ATTN_IMPLEMENTATION,
    KVCacheQuantizer,
    KVCacheSpec,
    fake_quantize_heads,
    register_attention,
)
from qcore.quant.linear import QuantLinear, replace_module
from qcore.quant.qparams import fake_quantize_minmax, fake_quantize_weight
from qcore.schemes import QuantArgs, QuantScheme
from qcore_flatquant.matrices import (
    fingerprint,
    identity,
    load_matrices,
    matrix_file,
    save_matrices,
)
from qcore_flatquant.transforms import (
    FlatQuantKeyTransform,
    FlatQuantTransform,
    decompose_dim,
    kron_matmul,
    random_orthogonal,
)

log = logging.getLogger(__name__)


def _diverged(layer: str, epoch: int, step: int, loss: float, lr: float, start: float
              ) -> str:
    """The message for a training step whose loss is NaN/inf, with the likely cause."""
    where = f"flatquant: {layer}, epoch {epoch}, step {step}: training loss is {loss}"
    if start != start or start == float("inf"):
        return (f"{where}, and was already non-finite before training: the layer's inputs "
                "or its float targets hold NaN/inf")
    return (f"{where} (started at {start:.3e}): the optimisation diverged; lower lr "
            f"(now {lr:g}) or the clip learning-rate multiplier")


class FlatQuantConfig(BaseModel):
    """Options of the flatquant method (defaults: the FlatQuant authors' scripts)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=15, ge=0, description="training epochs per decoder layer")
    batch_size: int = Field(default=4, gt=0, description="calibration windows per step")
    lr: float = Field(default=5e-3, gt=0, description="AdamW learning rate of the transforms "
                                                      "and per-channel scales")
    clip_lr_multiplier: float = Field(default=10.0, gt=0, description="clipping factors learn "
                                                                      "at lr x this")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (the "
                                "reference builds AdamW with torch's default, 0.01)")
    min_lr_ratio: float = Field(default=1e-3, gt=0, le=1, description="cosine schedule ends "
                                "at lr x this")
    add_diag: bool = Field(default=True, description="learn per-channel scales c (x diag(c))")
    diag_alpha: float = Field(default=0.3, ge=0, le=1, description="SmoothQuant-style init "
                              "c = max|W_col|^(1-alpha) / max|X|^alpha")
    lwc: bool = Field(default=True, description="learnable weight clipping (per output row)")
    lac: bool = Field(default=True, description="learnable activation clipping (per linear)")
    clip_init: float = Field(default=4.0, description="initial logit of every clipping "
                             "factor (sigmoid(4) = 0.982)")
    train_transforms: bool = Field(default=True, description="learn the transform matrices "
                                   "(False keeps their random orthogonal init)")
    init: Literal["random_orthogonal", "identity"] = Field(
        default="random_orthogonal", description="initial transform matrices")
    key_transform: bool = Field(default=True, description="learn the key-cache transform "
                                "P_k when the scheme quantizes the KV cache")
    normalize_loss: bool = Field(default=True, description="optimise MSE / MSE.detach() "
                                 "as the reference does (same direction, unit scale)")
    train_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="autocast dtype of the training forward")
    seed: int = Field(default=0, description="seed of the random orthogonal inits "
                      "(layer i uses seed + i)")
    ascend: bool = Field(
        default=False, description="msModelSlim's W4A4_FLATQUANT_DYNAMIC, the FlatQuant "
        "variant vllm-ascend runs (export with --format ascendv1): activations per token "
        "symmetric, scaled by sigmoid(clip) x max|x| / 7 with one learned clip ratio per "
        "fused input (q/k/v share one, gate/up one), and no head/value transform for "
        "o_proj (its transform is the identity)")
    fuse: bool | None = Field(
        default=None, description="fuse the training step's fake quantizers and weight "
        "clipping with torch.compile (inductor; a C++ compiler on CPU): the same maths in a "
        "few kernels instead of dozens of elementwise passes. None: on where the layer "
        "trains on the CPU, off elsewhere (eager PyTorch)")
    matrices: str | None = Field(
        default=None, description="a folder for each decoder layer's trained learnables "
        "(the reference's --save_matrix/--reload_matrix): a layer's file is written once it "
        "is trained and loaded instead of training when it is already there, so an "
        "interrupted calibration resumes at the first missing layer and gives what an "
        "uninterrupted one gives. A file trained for another model, calibration, scheme or "
        "training option is refused")
    weight_method: str = Field(
        default="rtn", description="registered weight solver that rounds the folded weights: "
        "'rtn' (round-to-nearest), 'gptq' (Hessians of the transformed, clipped, quantized "
        "inputs, true-sequential inside the layer), or any third-party solver")
    weight_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the weight solver (its Config, e.g. "
        "{act_order: true, static_groups: true} for gptq)")


# ----------------------------------------------------------------------------- fake quant (STE)
def fake_quant_tokens_ste(x: torch.Tensor, args: QuantArgs, clip_min: torch.Tensor | float,
                          clip_max: torch.Tensor | float, clamp: bool = True) -> torch.Tensor:
    """Per-token min/max fake quantization with the learned clip factors.

    Symmetric with ``clamp``: values are clamped to [-a, a] first (a = the larger clipped
    magnitude), so a clipped negative value maps to code -(2^(b-1) - 1) as in qcore's
    deployed path (the online transform clamps, qcore quantizes); the reference lets it
    reach -2^(b-1). Without (``ascend``), it does: the scale is ``clip * max|x| / (2^(b-1) -
    1)`` and codes saturate at [-2^(b-1), 2^(b-1) - 1], as the per-linear ``clip_ratio``
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


#: set when torch.compile failed under the default ``fuse`` (e.g. no C++ compiler): the rest
#: of the process trains eagerly instead of failing again on every layer
_COMPILE_FAILED: list[str] = []


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

    ``names`` maps the roles q, k, v, o, gate, up, down to linear names in the layer."""

    def __init__(self, layer: nn.Module, names: dict[str, str], num_heads: int, head_dim: int,
                 num_kv_heads: int, config: FlatQuantConfig, with_key: bool,
                 gen: torch.Generator) -> None:
        super().__init__()
        self.names = names
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.config = config
        hidden = layer.get_submodule(names["q"]).in_features
        inter = layer.get_submodule(names["down"]).in_features
        init = config.init
        self.ln = _Kron(hidden, init, gen, config.add_diag)
        self.up = _Kron(hidden, init, gen, config.add_diag)
        self.down = _Kron(inter, init, gen, config.add_diag)
        # ascend: o_proj keeps no transform (vllm-ascend has no head transform to load)
        self.o = None if config.ascend else _Single(num_heads, init, gen)
        self.v = None if config.ascend else _Single(head_dim, init, gen)
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
        self.fuse = bool(config.fuse)  # build_transforms resolves None for the device

    def call(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        """``fn(*args, **kwargs)``, fused by torch.compile when ``fuse`` is on. Under the
        default (``fuse`` unset) a compiler failure falls back to eager PyTorch with one
        warning; asked for explicitly (``fuse=true``), it raises. Compiled variants are per
        shape, dtype and grad mode (8 at most per function: torch's recompile limit), which
        covers a decoder layer's four weight shapes, trained and evaluated."""
        if not self.fuse or args[0].dtype == torch.float64:  # float64: the one-off folding
            return fn(*args, **kwargs)
        from torch._dynamo.exc import TorchDynamoException
        from torch._inductor.exc import InductorError

        try:
            return fused(fn)(*args, **kwargs)
        except (TorchDynamoException, InductorError) as err:
            if self.config.fuse:
                raise
            _COMPILE_FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0][:200]}")
            log.warning("flatquant: torch.compile failed (%s); training with eager PyTorch "
                        "from here on (set fuse=false to skip the attempt)",
                        _COMPILE_FAILED[0])
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
        if lac and self.config.ascend:  # one ratio per fused input
            out += [self.aclip_max[_key(self._clip_owner(n))] for n in self.names.values()
                    if self._clip_owner(n) == n]
        elif lac:
            out += list(self.aclip_max.values()) + list(self.aclip_min.values())
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
        cleared by a forward pre-hook that :func:`training_layer` installs)."""
        if self._mats is None:
            self._mats = self.mats(torch.float32)
        return self._mats

    def clear_cache(self, *_: Any) -> None:
        self._mats: dict[str, Any] | None = None
        self._inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def shared_input(self, role: str, x: torch.Tensor, m: dict[str, Any]) -> torch.Tensor:
        """:meth:`transform_input` of ``x`` in float32, computed once for the linears that
        read the same tensor (q/k/v, gate/up) during one layer forward."""
        group = "o" if role == "o" else self._group(role)
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

    def _group(self, role: str) -> str:
        return {"q": "ln", "k": "ln", "v": "ln", "gate": "up", "up": "up", "down": "down"}[role]

    def transform_input(self, role: str, x: torch.Tensor, m: dict[str, Any]) -> torch.Tensor:
        """The online transform, with the per-channel scale still separate."""
        if role == "o":
            return x if self.o is None else kron_matmul(x, m["o"], None)
        g = m[self._group(role)]
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
            g = m[self._group(role)]
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

    def _clip_owner(self, name: str) -> str:
        """The linear whose activation clip ``name`` uses: itself, or with ``ascend`` the
        first of the linears fed the same input (vllm-ascend fuses q/k/v and gate/up and
        keeps one ratio for each fused layer)."""
        if not self.config.ascend:
            return name
        role = self.role[name]
        return self.names["q"] if role in ("q", "k", "v") else \
            self.names["gate"] if role in ("gate", "up") else name

    def act_clip(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        k = _key(self._clip_owner(name))
        if not self.config.lac:
            one = torch.ones((), device=self.aclip_min[k].device)
            return one, one
        if self.config.ascend:  # one ratio on both ends (msModelSlim's)
            ratio = torch.sigmoid(self.aclip_max[k])
            return ratio, ratio
        return torch.sigmoid(self.aclip_min[k]), torch.sigmoid(self.aclip_max[k])


# ----------------------------------------------------------------------------- training modules
class _TrainLinear(nn.Module):
    """Stands in for a linear during training: transform + fake quant (STE) of both sides."""

    def __init__(self, owner: LayerTransforms, name: str, linear: nn.Linear,
                 scheme: QuantScheme | None) -> None:
        super().__init__()
        self.linear = linear
        self.name = name
        self.role = owner.role[name]
        self.scheme = scheme
        object.__setattr__(self, "owner", owner)  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner: LayerTransforms = self.owner  # type: ignore[assignment]
        m = owner.cached_mats()
        dtype = x.dtype
        x = owner.shared_input(self.role, x, m)
        w = self.linear.weight.detach().float()
        b = None if self.linear.bias is None else self.linear.bias.detach().float()
        quant = self.scheme is not None
        w, b = owner.transform_weight(self.role, self.name, w, b, m, clip=quant)
        if quant:
            w = owner.call(fake_quantize_weight, w, self.scheme.weights, ste=True)
            act = self.scheme.activations
            if act is not None:
                cmin, cmax = owner.act_clip(self.name)
                x = owner.call(fake_quant_tokens_ste, x, act, cmin, cmax,
                               clamp=not owner.config.ascend)
        return F.linear(x, w, b).to(dtype)


class _TrainKV(nn.Module):
    """Training-time ``qcore_kv`` module: key transform and STE fake quantization."""

    def __init__(self, owner: LayerTransforms, kv: QuantArgs | None) -> None:
        super().__init__()
        self.kv = kv
        object.__setattr__(self, "owner", owner)

    def forward(self, query, key, value):
        owner: LayerTransforms = self.owner  # type: ignore[assignment]
        if owner.k is not None:
            dtype = key.dtype
            m = owner.cached_mats()
            pk, pk_it = m["k"], m["k_it"]
            query = torch.matmul(query.float(), pk_it).to(dtype)
            key = torch.matmul(key.float(), pk).to(dtype)
        if self.kv is not None:
            key = fake_quantize_heads(key.float(), self.kv, ste=True).to(key.dtype)
            value = fake_quantize_heads(value.float(), self.kv, ste=True).to(value.dtype)
        return query, key, value


@contextmanager
def training_layer(layer: nn.Module, owner: LayerTransforms, attn_name: str,
                   scheme: QuantScheme | None) -> Iterator[nn.Module]:
    """Swap the layer's linears for training wrappers (and attach the training KV module);
    ``scheme=None`` runs the transforms with every quantizer and clip off."""
    originals = {}
    for name in owner.names.values():
        linear = layer.get_submodule(name)
        originals[name] = replace_module(layer, name, _TrainLinear(owner, name, linear, scheme))
    attn = layer.get_submodule(attn_name)
    old_kv = getattr(attn, "qcore_kv", None)
    kv_args = scheme.kv_cache if scheme is not None else None
    attn.qcore_kv = _TrainKV(owner, kv_args)
    hook = layer.register_forward_pre_hook(owner.clear_cache)
    try:
        yield layer
    finally:
        hook.remove()
        owner.clear_cache()
        for name, linear in originals.items():
            replace_module(layer, name, linear)
        if old_kv is None:
            del attn.qcore_kv
        else:
            attn.qcore_kv = old_kv


# ----------------------------------------------------------------------------- folding
@torch.no_grad()
def fold_layer(layer: nn.Module, owner: LayerTransforms, norms: tuple[str, str],
               act: QuantArgs | None, clip: bool = True
               ) -> tuple[dict[str, FlatQuantTransform], FlatQuantKeyTransform | None]:
    """Fold the learned transforms into ``layer`` in float64, in place.

    Linear weights become ``clip(W diag(1/c) P^-T)`` (v_proj's rows times ``P_v``, up_proj's
    rows times down's scale), the norms absorb the q/k/v and gate/up scales. Returns the
    online transform per linear name (Kronecker matrices + learned activation clip) and the
    key-cache transform (or None)."""
    m = owner.mats(torch.float64)
    names = owner.names
    transforms: dict[str, FlatQuantTransform] = {}
    # ascend: the clip is the activation quantizer's clip_ratio (FlatQuantQuantizer.
    # _activations), not a clamp in the transform
    clip_mode = "none" if act is None or not clip or not owner.config.lac \
        or owner.config.ascend else ("sym" if act.symmetric else "asym")
    for role, name in names.items():
        linear = layer.get_submodule(name)
        dtype = linear.weight.dtype
        w = linear.weight.detach().double()
        b = None if linear.bias is None else linear.bias.detach().double()
        w, b = owner.transform_weight(role, name, w, b, m, clip=clip)
        if role == "up" and m["down"]["c"] is not None:
            w = w * m["down"]["c"].unsqueeze(1)
            if b is not None:
                b = b * m["down"]["c"]
        linear.weight.data = w.to(dtype)
        if b is not None:
            linear.bias.data = b.to(dtype)
        if role == "o" and owner.o is None:  # identity (ascend)
            tr = FlatQuantTransform(*decompose_dim(linear.in_features), clip=clip_mode)
        elif role == "o":
            tr = FlatQuantTransform(owner.num_heads, owner.head_dim, has_right=False,
                                    clip=clip_mode)
            tr.left.copy_(m["o"])
        else:
            g = m[owner._group(role)]
            tr = FlatQuantTransform(g["L"].shape[0], g["R"].shape[0], clip=clip_mode)
            tr.left.copy_(g["L"])
            tr.right.copy_(g["R"])
        if clip_mode != "none":
            cmin, cmax = owner.act_clip(name)
            tr.clip_min.copy_(cmin)
            tr.clip_max.copy_(cmax)
        transforms[name] = tr.to(linear.weight.device)
    for norm_name, group in zip(norms, ("ln", "up"), strict=True):
        c = m[group]["c"]
        if c is None:
            continue
        norm = layer.get_submodule(norm_name)
        norm.weight.data = (norm.weight.detach().double() * c).to(norm.weight.dtype)
        if getattr(norm, "bias", None) is not None:
            norm.bias.data = (norm.bias.detach().double() * c).to(norm.bias.dtype)
    key = None
    if owner.k is not None:
        key = FlatQuantKeyTransform(owner.head_dim)
        key.matrix.copy_(m["k"])
        key.matrix_inv_t.copy_(m["k_it"])
        key = key.to(owner.k.matrix.device)
    return transforms, key


# ----------------------------------------------------------------------------- batching
def _shared_kwargs(kwargs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """One set of layer keyword arguments valid for any batch size: tensors whose first dim
    is the calibration batch must be identical across it (no padding) and are cut to 1."""

    def squeeze(key: str, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch and batch > 1:
            if not torch.equal(v, v[:1].expand_as(v)):
                raise ValueError(f"flatquant: layer argument {key!r} differs across the "
                                 "calibration batch (padded windows?); cannot re-batch")
            return v[:1]
        if isinstance(v, tuple):
            return tuple(squeeze(key, x) for x in v)
        if isinstance(v, list):
            return [squeeze(key, x) for x in v]
        return v

    return {k: squeeze(k, v) for k, v in kwargs[0].items()}


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


# ----------------------------------------------------------------------------- quantizer
class FlatQuantQuantizer(Quantizer):
    name = "flatquant"
    Config = FlatQuantConfig
    description = "learned Kronecker affine transforms + learned clipping, per layer (W4A4/W8A8)"
    propagation = "full"
    needs_fp_outputs = True  # the training targets
    required_roles = ("attention", "q", "k", "v", "o", "gate", "up", "down", "attention_norm",
                      "mlp_norm")
    solver: WeightSolver | None = None  # set by bind()

    def __init__(self, config: FlatQuantConfig, scheme: QuantScheme) -> None:
        super().__init__(config, scheme)
        if config.ascend:  # activations symmetric with the signed range, as the NPU's
            act = scheme.activations.model_copy(update={"symmetric": True,
                                                        "symmetric_range": "signed"})
            self.scheme = scheme.model_copy(update={
                "name": f"{scheme.name}-ascend", "activations": QuantArgs.model_validate(
                    act.model_dump())})

    def check_scheme(self, scheme: QuantScheme) -> None:
        if self.config.ascend:
            w, act = scheme.weights, scheme.activations
            if (act is None or act.bits != 4 or w.bits != 4 or not w.symmetric
                    or w.granularity != "channel" or scheme.kv_cache is not None):
                raise UnsupportedScheme(
                    f"flatquant ascend=true writes msModelSlim's W4A4_FLATQUANT_DYNAMIC: int4 "
                    f"symmetric per-channel weights, int4 per-token activations and no KV-cache "
                    f"quantization; scheme {scheme.name} has weights {w.describe()}, "
                    f"activations {act.describe() if act else 'none'}"
                    f"{', a quantized KV cache' if scheme.kv_cache else ''} (use --scheme W4A4)")
        if scheme.kv_cache is not None and not scheme.kv_cache.dynamic:
            raise UnsupportedScheme(
                f"flatquant quantizes the KV cache dynamically (per token and head, with its "
                f"learned key transform); scheme {scheme.name} asks static KV scales "
                f"({scheme.kv_cache.describe()}): use W4A4KV4, or smoothquant for static KV")
        act = scheme.activations
        if act is not None and act.granularity != "token":
            raise UnsupportedScheme(
                f"flatquant quantizes activations per token (dynamic); scheme {scheme.name} "
                f"asks activations.granularity={act.granularity!r}")
        if scheme.weights.granularity == "tensor":
            raise UnsupportedScheme(f"flatquant needs per-channel or per-group weights, not "
                                    f"per-tensor (scheme {scheme.name})")

    def online_transforms(self) -> bool:
        return True  # each QuantLinear keeps its Kronecker transform as input_transform

    def bind(self, plugins: Any) -> None:
        """The weight solver, from the run's plugin manager, with validated options."""
        self.solver = api.build_solver(self.config.weight_method, self.config.weight_options,
                                       self.scheme.weights, plugins,
                                       owner="flatquant weight_method")

    def prepare(self, model: nn.Module, adapter: Any) -> None:
        if self.solver is None:
            raise RuntimeError("flatquant: bind(plugins) resolves the weight solver before "
                               "the run (qcore.api.build_quantizer does)")
        if self.scheme.kv_cache is not None:
            # attention through qcore_kv; a layer gets its qcore_kv module when it is trained
            register_attention()
            model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _roles(self, adapter: Any) -> dict[str, str]:
        r = adapter.roles()
        return {"q": r.q, "k": r.k, "v": r.v, "o": r.o, "gate": r.gate, "up": r.up,
                "down": r.down}

    def build_transforms(self, ctx: LayerContext, init_diag: bool = True) -> LayerTransforms:
        """The layer's learnables at their init (``init_diag=False``: skip the calibration
        pass of the per-channel scales' init, for learnables about to be loaded)."""
        info = ctx.adapter.attention_info()
        roles = self._roles(ctx.adapter)
        gen = torch.Generator().manual_seed(self.config.seed + ctx.index)
        with_key = self.scheme.kv_cache is not None and self.config.key_transform
        owner = LayerTransforms(ctx.layer, roles, info.num_heads, info.head_dim,
                                info.num_kv_heads, self.config, with_key, gen)
        owner.to(ctx.device)
        owner.fuse = self.config.fuse if self.config.fuse is not None else \
            ctx.device.type == "cpu" and not _COMPILE_FAILED
        if self.config.add_diag and init_diag:
            absmax = ctx.input_absmax([roles["q"], roles["gate"], roles["down"]])
            owner.init_diag(ctx.layer, absmax)
        return owner

    def train(self, ctx: LayerContext, owner: LayerTransforms) -> dict[str, Any]:
        cfg = self.config
        inputs = torch.cat(list(ctx.inputs))
        targets = torch.cat(list(ctx.fp_outputs))
        kw = _shared_kwargs(ctx.kwargs, ctx.batch_shapes()[0][0])
        n = inputs.shape[0]
        bs = min(cfg.batch_size, n)
        steps_per_epoch = n // bs
        batches = [(inputs[i * bs:(i + 1) * bs], targets[i * bs:(i + 1) * bs])
                   for i in range(steps_per_epoch)]
        attn = ctx.adapter.roles().attention
        device = ctx.device
        amp = cfg.train_dtype == "bfloat16"

        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

        def evaluate() -> tuple[float, float]:
            """(mean MSE, relative MSE) of the training-time (fake-quantized) layer."""
            total, err, ref = 0.0, 0.0, 0.0
            with torch.no_grad(), autocast():
                for x, y in batches:
                    diff = _out(ctx.layer(x, **kw)).float() - y.float()
                    total += float(diff.pow(2).mean())
                    err += float(diff.pow(2).sum())
                    ref += float(y.float().pow(2).sum())
            return total / len(batches), err / max(ref, 1e-30)

        for p in ctx.layer.parameters():
            p.requires_grad_(False)
        trans = owner.transform_parameters() if cfg.train_transforms else []
        diag = [k.diag for k in (owner.ln, owner.up, owner.down) if k.diag is not None]
        trans = [p for p in trans if all(p is not d for d in diag)] + diag
        clips = owner.clip_parameters(cfg.lwc, cfg.lac and self.scheme.activations is not None)
        for p in owner.parameters():
            p.requires_grad_(False)
        groups = []
        if trans:
            groups.append({"params": trans, "lr": cfg.lr})
        if clips:
            groups.append({"params": clips, "lr": cfg.lr * cfg.clip_lr_multiplier})
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(True)

        epoch_losses: list[float] = []
        t0 = time.perf_counter()
        with training_layer(ctx.layer, owner, attn, self.scheme):
            loss_start, rel_start = evaluate()
            t_steps = time.perf_counter()
            if groups and cfg.epochs > 0:
                opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
                total = cfg.epochs * steps_per_epoch
                sched = torch.optim.lr_scheduler.CosineAnnealingLR(
                    opt, T_max=total, eta_min=cfg.lr * cfg.min_lr_ratio)
                with torch.enable_grad():
                    for epoch in range(cfg.epochs):
                        acc = 0.0
                        for step, (x, y) in enumerate(batches):
                            with autocast():
                                out = _out(ctx.layer(x, **kw))
                            loss = F.mse_loss(out.float(), y.float())
                            if not torch.isfinite(loss):
                                raise NonFiniteError(_diverged(ctx.name, epoch, step,
                                                               float(loss.detach()), cfg.lr,
                                                               loss_start))
                            acc += float(loss.detach())
                            objective = loss / loss.detach() if cfg.normalize_loss else loss
                            opt.zero_grad(set_to_none=True)
                            objective.backward()
                            opt.step()
                            sched.step()
                        epoch_losses.append(acc / steps_per_epoch)
            t_steps = time.perf_counter() - t_steps
            loss_end, rel_end = evaluate()
        for p in owner.parameters():
            p.requires_grad_(False)
        return {"loss_start": loss_start, "loss_end": loss_end,
                "loss_ratio": loss_end / max(loss_start, 1e-30),
                "train_relative_mse_start": rel_start, "train_relative_mse_end": rel_end,
                "epoch_losses": epoch_losses, "train_seconds": time.perf_counter() - t0,
                "steps": (steps := cfg.epochs * steps_per_epoch if groups else 0),
                "step_seconds": t_steps / steps if steps else 0.0}

    def install(self, ctx: LayerContext, owner: LayerTransforms) -> dict[str, Any]:
        """Fold, round the weights with the weight solver and attach the online transforms.

        A Hessian-based solver must see what each QuantLinear really multiplies, so the
        linears are first put in place rounded to nearest (with their transforms and the KV
        quantizer), then solved group by group."""
        roles = ctx.adapter.roles()
        act = self.scheme.activations
        acts = self._activations(owner)
        transforms, key = fold_layer(ctx.layer, owner, (roles.attention_norm, roles.mlp_norm),
                                     act)
        folded = {name: ctx.submodule(name) for name in transforms}
        if self.solver.needs_hessian:
            for name, tr in transforms.items():
                ctx.replace(name, QuantLinear.from_float(
                    folded[name], self.scheme.weights, activations=acts[name],
                    input_transform=tr, transform_spec=tr.spec()))
        stats: dict[str, Any] = {}
        attn = ctx.submodule(roles.attention)
        kv = self.scheme.kv_cache
        if kv is not None:
            spec = KVCacheSpec(keys=kv, values=kv,
                               key_transform=key.spec() if key is not None else None)
            attn.qcore_kv = KVCacheQuantizer(spec, key_transform=key)
        specs = {name: (tr, tr.spec()) for name, tr in transforms.items()}
        stats.update(ctx.solve_linears(self.solver, folded, self.scheme.weights,
                                       activations=acts, transforms=specs))
        return stats

    def _activations(self, owner: LayerTransforms) -> dict[str, QuantArgs | None]:
        """Each linear's activation quantizer: the scheme's, or with ``ascend`` the scheme's
        with the learned clip as its ``clip_ratio`` (a float32 value: what the export's
        float32 ``clip_ratio`` tensor holds)."""
        act = self.scheme.activations
        if act is None or not self.config.ascend:
            return dict.fromkeys(owner.names.values(), act)
        out: dict[str, QuantArgs | None] = {}
        for name in owner.names.values():
            ratio = float(owner.act_clip(name)[1].detach().float().cpu())
            out[name] = act.model_copy(update={"clip_ratio": ratio})
        return out

    def _identity(self, ctx: LayerContext) -> dict[str, Any]:
        """What this layer's training depends on (checked against a saved matrices file)."""
        return identity(self.scheme, self.config, ctx.name,
                        weights=fingerprint(ctx.layer.parameters()),
                        inputs=fingerprint(ctx.inputs))

    def trained_transforms(self, ctx: LayerContext) -> tuple[LayerTransforms, dict[str, Any]]:
        """The layer's trained learnables and training statistics: trained now, or loaded
        from the ``matrices`` folder (and saved there once trained)."""
        if self.config.matrices is None:
            owner = self.build_transforms(ctx)
            return owner, self.train(ctx, owner)
        path = matrix_file(self.config.matrices, ctx.name)
        ident = self._identity(ctx)
        if path.exists():
            state, stats = load_matrices(path, ident)
            owner = self.build_transforms(ctx, init_diag=False)
            owner.load_state_dict(state)
            ctx.log.info("%s: flatquant matrices loaded from %s", ctx.name, path)
            return owner, {**stats, "reloaded": True}
        owner = self.build_transforms(ctx)
        stats = self.train(ctx, owner)
        save_matrices(path, owner.state_dict(), ident, stats)
        return owner, stats

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        owner, stats = self.trained_transforms(ctx)
        stats.update(self.install(ctx, owner))
        stats["seconds_total"] = time.perf_counter() - t0
        ctx.log.info("%s: flatquant loss %.3e -> %.3e in %.1fs", ctx.name, stats["loss_start"],
                     stats["loss_end"], stats["train_seconds"])
        return stats
