"""ascendV1: msModelSlim's layout, which vllm-ascend and MindIE read.

A folder holds ``quant_model_description.json`` (every tensor name mapped to its type,
plus ``version``, ``model_quant_type``, ``group_size`` and empty ``metadata`` and
``optional``), the weights as ``quant_model_weights-0000i-of-0000n.safetensors`` with
``quant_model_weights.safetensors.index.json``, and ``config.json`` (without a
``quantization_config``) and the tokenizer files. Per quantized linear (N outputs, K
inputs), codes are signed (``q_s = q - 2**(bits-1)``) and dequantize as
``(q_s - weight_offset) * weight_scale`` (``weight_offset = zero - 2**(bits-1)``):

* ``W8A16``: ``weight`` int8 (N, K), ``weight_scale``, ``weight_offset`` float32 (N, 1);
* ``W4A16``: two int4 per int8 byte; per channel (N, K/2), the low nibble the even
  column; per group (N/2, K), the low nibble row 2i and the high nibble row 2i+1;
  ``weight_scale``, ``weight_offset`` float32 (N, K/G) (msModelSlim's v0 packing: its v1
  saver has no int4-weight class);
* ``W8A8_DYNAMIC``: ``weight`` int8, ``weight_scale`` (N, 1), ``weight_offset`` zeros;
  activations quantized per token at run time (``npu_dynamic_quant``, symmetric);
* ``W8A8`` (static): ``weight`` int8, ``input_scale``, ``input_offset`` float32 [1],
  ``deq_scale`` (N): int64 holding the float32 bit pattern of ``input_scale *
  weight_scale`` (float32 itself for bf16 models), ``quant_bias`` int32 (N)
  ``= round(bias / deq_scale - input_offset * sum_k q_s)`` (as msModelSlim's v1 saver:
  no ``weight_scale``; qcore's reader recovers it as ``deq_scale / input_scale``, within
  one float32 rounding).

* ``W4A4_FLATQUANT_DYNAMIC`` (qcore's ``flatquant`` with ``ascend=true``): ``weight`` int8
  holding one int4 value each (N, K), ``weight_scale`` float32 (N, 1), ``weight_offset``
  zeros, ``left_trans`` (n1, n1) and ``right_trans`` (n2, n2) float32 (n1 x n2 = K, FlatQuant's
  factorization, which vllm-ascend recomputes), ``clip_ratio`` float32 [1]; vllm-ascend
  computes ``left^T X right`` per token (npu_kronecker_quant), int4 codes with scale
  ``clip_ratio * max|x| / 7`` and an integer matmul. q/k/v (and gate/up), which it fuses,
  must share transform and ratio.

A static KV cache (``W8A8C8``, or ``W8A8C8-TENSOR`` written per channel) is ``C8``:
``<attn>.k_proj.kv_cache_scale`` and ``<attn>.v_proj.kv_cache_scale`` float32
[num_kv_heads * head_dim] (head-major) with zero ``kv_cache_offset`` beside them, and
``kv_cache_type`` / ``kv_quant_type`` ``"C8"`` in the description; vllm-ascend quantizes
the post-RoPE keys and values with the scale (offsets are not applied: they must be 0).

Everything else (embeddings, norms, ``lm_head`` even when tied to the embeddings, and
every bias, in float32) is ``FLOAT``. Shards are named and indexed as msModelSlim's
saver names them (an index even for one shard; 4 GB shards by default). Refused, naming
the layer: qcore's default FlatQuant (:data:`FLATQUANT_GAP`: asymmetric activations with
two clip ratios, a head transform on o_proj), activations other than the ones above,
weight widths other than 4 and 8, and qcore's dynamic KV cache (``C8`` stores static
scales) or a static one other than 8-bit symmetric.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.errors import SavedModelError
from qcore.hookspecs import hookimpl
from qcore.interfaces import Format, SavedModel
from qcore.io import atomic_directory
from qcore.quant.kvcache import attach_static_kv, attention_modules, kv_layout, kv_quantizers
from qcore.quant.linear import QuantLinear, QuantLinearSpec, TransformSpec, build_transform
from qcore.quant.packing import pack_codes
from qcore.quant.qparams import group_index
from qcore.schemes import QuantArgs, QuantScheme
from qcore_builtins.checkpoints import (
    NotExpressible,
    SafetensorsFolder,
    assemble,
    expect_tensor,
    layer_specs,
    write_safetensors,
)

DESCRIPTION = "quant_model_description.json"
WEIGHTS_PATTERN = "quant_model_weights{suffix}.safetensors"
WEIGHTS_INDEX = "quant_model_weights.safetensors.index.json"
VERSION = "1.0.0"
FLOAT = "FLOAT"
#: the model's type is its lowest-bit layer type (msModelSlim's priority, first wins)
PRIORITY = ("W4A4_FLATQUANT_DYNAMIC", "W4A16", "W8A8", "W8A8_DYNAMIC", "W8A16")
FLATQUANT = "W4A4_FLATQUANT_DYNAMIC"
#: msModelSlim's static int8 KV cache
C8 = "C8"
#: the C8 tensors live under these linears of an attention module
KV_LINEARS = {"key": "k_proj", "value": "v_proj"}
#: the transform type of qcore's FlatQuant linears (the flatquant plugin's KRON_TYPE)
KRON_TYPE = "flatquant_kron"
#: linears vllm-ascend fuses into one layer (one transform and clip ratio for all)
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
#: msModelSlim's shard size
DEFAULT_SHARD = "4GB"


#: why qcore's default FlatQuant models are not written as W4A4_FLATQUANT_DYNAMIC
#: (msModelSlim's FlatQuant and vllm-ascend's w4a4_flatquant, read from their source)
FLATQUANT_GAP = ("online FlatQuant transforms: ascendV1's W4A4_FLATQUANT_DYNAMIC quantizes "
                 "activations per token symmetrically with one clip ratio per fused input "
                 "and has no head transform for o_proj, while qcore's default FlatQuant "
                 "learns separate min/max clip ratios over asymmetric activations; writing "
                 "it would change the numbers. Quantize with --method flatquant --set "
                 "ascend=true (msModelSlim's variant) for this format")


# ----------------------------------------------------------------------------- types
def layer_type(name: str, m: QuantLinear) -> str:
    """The ascendV1 type of a quantized linear, or NotExpressible naming what is missing."""
    w, a = m.spec.weights, m.spec.activations
    if m.input_transform is not None:
        return _flatquant_type(name, m)
    if w.granularity not in ("channel", "group"):
        raise NotExpressible(f"{name}: per-{w.granularity} weights; ascendV1 takes "
                             "per-channel or grouped weights")
    if not m.contiguous_groups():
        raise NotExpressible(f"{name}: act-order g_idx with permuted groups; ascendV1 "
                             "stores contiguous groups: quantize with static_groups=true")
    if a is None:
        if w.bits in (4, 8):
            return f"W{w.bits}A16"
        raise NotExpressible(f"{name}: int{w.bits} weight-only; ascendV1 holds W8A16 and "
                             "W4A16")
    if w.bits != 8 or not w.symmetric or w.granularity != "channel":
        raise NotExpressible(f"{name}: {w.describe()} weights with activations; ascendV1's "
                             "W8A8 types take int8 symmetric per-channel weights")
    if a.bits == 8 and a.clip_ratio == 1.0:
        if a.granularity == "token" and a.dynamic and a.symmetric:
            if a.symmetric_range != "signed":
                raise NotExpressible(f"{name}: per-token activations scaled by max |x| / "
                                     "127.5 (symmetric_range full); W8A8_DYNAMIC's "
                                     "npu_dynamic_quant divides by 127")
            return "W8A8_DYNAMIC"
        if a.granularity == "tensor" and not a.dynamic:
            return "W8A8"
    raise NotExpressible(f"{name}: activations {a.describe()}"
                         f"{f' clipped to {a.clip_ratio}' if a.clip_ratio != 1 else ''}; "
                         "ascendV1 holds int8 per-token dynamic symmetric (W8A8_DYNAMIC) or "
                         "int8 per-tensor static (W8A8) activations")


def _flatquant_type(name: str, m: QuantLinear) -> str:
    """W4A4_FLATQUANT_DYNAMIC for what vllm-ascend computes: ``x (-1, n1, n2) -> left^T X
    right`` (npu_kronecker_quant), then int4 codes per token with scale ``clip_ratio *
    max|x| / 7``, times int4 symmetric per-channel weights."""
    w, a, t = m.spec.weights, m.spec.activations, m.spec.input_transform
    cfg = t.config if t is not None else {}
    if t is None or t.type != KRON_TYPE or not cfg.get("has_right") or \
            cfg.get("clip", "none") != "none":
        raise NotExpressible(f"{name}: {FLATQUANT_GAP}")
    if cfg["n1"] * cfg["n2"] != m.in_features:
        raise NotExpressible(f"{name}: a {cfg['n1']} x {cfg['n2']} transform over "
                             f"{m.in_features} inputs")
    if w.bits != 4 or not w.symmetric or w.granularity != "channel" or a is None or \
            a.bits != 4 or a.granularity != "token" or not a.dynamic or not a.symmetric or \
            a.symmetric_range != "signed":
        raise NotExpressible(
            f"{name}: {w.describe()} weights, activations "
            f"{a.describe() if a else 'none'}; {FLATQUANT} takes int4 symmetric per-channel "
            "weights and int4 symmetric per-token activations (max |x| / 7)")
    return FLATQUANT


def _check_fused(linears: dict[str, QuantLinear]) -> None:
    """Linears vllm-ascend fuses (q/k/v, gate/up) must share their transform and clip."""
    for fused in FUSED:
        for name, m in linears.items():
            parent, _, leaf = name.rpartition(".")
            if leaf != fused[0] or m.input_transform is None:
                continue
            for other in fused[1:]:
                o = linears.get(f"{parent}.{other}")
                if o is None or o.input_transform is None:
                    continue
                same = (torch.equal(m.input_transform.left, o.input_transform.left)
                        and torch.equal(m.input_transform.right, o.input_transform.right)
                        and m.spec.activations == o.spec.activations)
                if not same:
                    raise NotExpressible(
                        f"{parent}.{other}: its transform or activation clip ratio differs "
                        f"from {name}'s, and vllm-ascend fuses {'/'.join(fused)} into one "
                        "layer with one of each (qcore's flatquant ascend=true shares them)")


def pack_int4_pairs(signed: torch.Tensor, dim: int) -> torch.Tensor:
    """Two signed int4 values per int8 byte along ``dim`` (0: rows 2i/2i+1, 1: columns
    2j/2j+1), the even index in the low nibble."""
    u = (signed.to(torch.int16) & 0xF)
    low, high = (u[0::2], u[1::2]) if dim == 0 else (u[:, 0::2], u[:, 1::2])
    byte = low | (high << 4)
    return torch.where(byte >= 128, byte - 256, byte).to(torch.int8)


def unpack_int4_pairs(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4_pairs`: signed int4 values as int16."""
    u = packed.to(torch.int16) & 0xFF
    low, high = u & 0xF, u >> 4
    pairs = torch.stack((low, high), dim=dim + 1)
    values = pairs.reshape(-1, packed.shape[1]) if dim == 0 else pairs.reshape(
        packed.shape[0], -1)
    return torch.where(values >= 8, values - 16, values)


def linear_tensors(name: str, m: QuantLinear, kind: str, bf16: bool = False
                   ) -> dict[str, torch.Tensor]:
    """The tensors msModelSlim's saver writes for one linear of type ``kind``."""
    w = m.spec.weights
    half = 2 ** (w.bits - 1)
    signed = m.codes().cpu().to(torch.int16) - half                 # (N, K)
    if kind == "W4A16":
        out = {f"{name}.weight": pack_int4_pairs(signed, 0 if w.granularity == "group"
                                                 else 1)}
    elif kind == FLATQUANT:  # one int4 value per int8 (vllm-ascend packs at load)
        t = m.input_transform
        out = {f"{name}.weight": signed.to(torch.int8),
               f"{name}.left_trans": t.left.detach().cpu().float().contiguous(),
               f"{name}.right_trans": t.right.detach().cpu().float().contiguous(),
               f"{name}.clip_ratio": torch.tensor([m.spec.activations.clip_ratio],
                                                  dtype=torch.float32)}
    else:
        out = {f"{name}.weight": signed.to(torch.int8)}
    if kind == "W8A8":
        a = m.spec.activations
        input_scale = m.input_scale.detach().cpu().float().reshape(1)
        input_offset = m.input_zero.detach().cpu().float().reshape(1) - 2 ** (a.bits - 1)
        deq = (input_scale * m.scales[:, 0].detach().cpu().float()).contiguous()
        bias = m.bias.detach().cpu().float() if m.bias is not None else torch.zeros(
            m.out_features)
        correction = signed.float().sum(dim=1) * input_offset
        out.update({
            f"{name}.quant_bias": torch.round(bias / deq - correction).to(torch.int32),
            f"{name}.input_scale": input_scale, f"{name}.input_offset": input_offset,
            f"{name}.deq_scale": deq if bf16 else deq.view(torch.int32).to(torch.int64)})
    else:
        out[f"{name}.weight_scale"] = m.scales.detach().float().cpu().contiguous()
        out[f"{name}.weight_offset"] = (m.zeros.cpu().float() - half).contiguous()
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().cpu().float().contiguous()
    return out


def export_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                dict[str, str]]:
    """(tensors, description types per tensor, type per quantized linear)."""
    kv = kv_quantizers(model)
    for name, q in kv.items():
        if problem := _kv_problem(q.spec.keys) or _kv_problem(q.spec.values):
            raise NotExpressible(f"{name}: {problem}")
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    if not linears:
        raise NotExpressible("the model has no quantized linear: nothing to export")
    kinds = {name: layer_type(name, m) for name, m in linears.items()}
    _check_fused(linears)
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    tensors: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    skipped = set(linears) | {f"{n}.qcore_kv" for n in kv}
    for name, tensor in model.state_dict().items():
        if any(name.startswith(f"{p}.") and p in skipped
               for p in _prefixes(name)):  # a linear's own (or its transform's) tensor
            continue
        # a tied lm_head is written too (msModelSlim does), as its own copy
        tensors[name] = tensor.detach().cpu().clone().contiguous()
        types[name] = FLOAT
    for name, m in linears.items():
        for tname, tensor in linear_tensors(name, m, kinds[name], bf16).items():
            tensors[tname] = tensor
            types[tname] = FLOAT if tname.endswith(".bias") else kinds[name]
    for name, q in kv.items():
        for role, linear in KV_LINEARS.items():
            # [heads, head_dim] as it is, or one per-tensor value in every channel
            scale = getattr(q, f"{role}_scale").detach().float().cpu().expand(
                kv_layout(model.config)).reshape(-1).contiguous()
            tensors[f"{name}.{linear}.kv_cache_scale"] = scale
            tensors[f"{name}.{linear}.kv_cache_offset"] = torch.zeros_like(scale)
            types[f"{name}.{linear}.kv_cache_scale"] = C8
            types[f"{name}.{linear}.kv_cache_offset"] = C8
    return tensors, types, kinds


def _kv_problem(kv: QuantArgs | None) -> str | None:
    """Why ascendV1's C8 cannot hold a KV quantizer (None: it can)."""
    if kv is None:
        return "keys or values left in float; C8 quantizes both"
    if kv.dynamic:
        return ("the KV cache is quantized dynamically per group at run time; ascendV1's C8 "
                "stores static KV scales: use --scheme W8A8C8")
    if kv.bits != 8 or not kv.symmetric:
        return f"KV cache {kv.describe()}; C8 is int8 symmetric (static scales, no offset)"
    return None


def _prefixes(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the modules a tensor name lies under."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _group_size(linears: dict[str, QuantLinear], kinds: dict[str, str]) -> int:
    sizes = {m.spec.weights.group_size or 0 for n, m in linears.items()
             if kinds[n] == "W4A16"}
    if len(sizes) > 1:
        raise NotExpressible(f"W4A16 layers with group sizes {sorted(sizes)}: ascendV1 "
                             "records one group_size per model")
    return sizes.pop() if sizes else 0


# ----------------------------------------------------------------------------- reading
def load_linear(name: str, linear: nn.Linear, kind: str, tensors: SafetensorsFolder,
                group_size: int, dtype: torch.dtype) -> QuantLinear:
    n, k = linear.out_features, linear.in_features
    bits = 4 if kind == "W4A16" else 8
    half = 2 ** (bits - 1)
    grouped = 0 < group_size < k and kind in ("W4A16", "W8A16")
    groups = k // group_size if grouped else 1
    weight = tensors.get(f"{name}.weight")
    if kind == "W4A16":
        shape = (n // 2, k) if grouped else (n, k // 2)
        expect_tensor(f"{name}.weight", weight, shape, (torch.int8,))
        signed = unpack_int4_pairs(weight, 0 if grouped else 1)
    else:
        expect_tensor(f"{name}.weight", weight, (n, k), (torch.int8,))
        signed = weight.to(torch.int16)
    floats = (torch.float32, torch.float16, torch.bfloat16)
    activations = None
    if kind == "W8A8":
        input_scale = tensors.get(f"{name}.input_scale").float().reshape(())
        input_offset = float(tensors.get(f"{name}.input_offset").reshape(()))
        deq = tensors.get(f"{name}.deq_scale")
        expect_tensor(f"{name}.deq_scale", deq, (n,), (torch.int64, *floats))
        deq = deq.to(torch.int32).view(torch.float32) if deq.dtype == torch.int64 \
            else deq.float()
        scale = (deq / input_scale).reshape(n, 1)
        offset = torch.zeros(n, 1)
        activations = QuantArgs(bits=8, symmetric=input_offset == 0, granularity="tensor")
    else:
        scale = tensors.get(f"{name}.weight_scale")
        expect_tensor(f"{name}.weight_scale", scale, (n, groups), floats)
        offset = tensors.get(f"{name}.weight_offset")
        expect_tensor(f"{name}.weight_offset", offset, (n, groups), floats)
        if kind == "W8A8_DYNAMIC":
            activations = QuantArgs(bits=8, symmetric=True, granularity="token",
                                    dynamic=True)
    weights = QuantArgs(bits=bits, symmetric=bool(torch.all(offset == 0)),
                        granularity="group" if grouped else "channel",
                        group_size=group_size if grouped else None)
    bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
    if bias is None and kind == "W8A8":  # the bias folded into quant_bias, deq_scale units
        quant_bias = tensors.get(f"{name}.quant_bias").double()
        folded = (quant_bias + input_offset * signed.double().sum(dim=1)) * deq.double()
        bias = folded if bool(torch.any(folded != 0)) else None
    spec = QuantLinearSpec(in_features=k, out_features=n, bias=bias is not None,
                           n_groups=groups, weights=weights, activations=activations)
    module = QuantLinear(spec, dtype=dtype)
    module.qweight = pack_codes((signed + half).to(torch.uint8), bits)
    module.scales = scale.float().contiguous()
    module.zeros = (offset.float() + half).round().to(torch.uint8)
    module.g_idx = group_index(k, weights).to(torch.int32)
    if kind == "W8A8":
        module.input_scale = input_scale
        module.input_zero = torch.tensor(input_offset + half)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return module


def load_flatquant_linear(name: str, linear: nn.Linear, tensors: SafetensorsFolder,
                          modules: dict[str, type[nn.Module]], dtype: torch.dtype
                          ) -> QuantLinear:
    """A W4A4_FLATQUANT_DYNAMIC linear as qcore's FlatQuant QuantLinear: the Kronecker
    transform (the flatquant plugin's module, from ``modules``), then int4 symmetric
    per-token activations with the stored clip ratio."""
    n, k = linear.out_features, linear.in_features
    floats = (torch.float32, torch.float16, torch.bfloat16)
    weight = tensors.get(f"{name}.weight")
    expect_tensor(f"{name}.weight", weight, (n, k), (torch.int8,))
    scale = tensors.get(f"{name}.weight_scale")
    expect_tensor(f"{name}.weight_scale", scale, (n, 1), floats)
    left, right = tensors.get(f"{name}.left_trans"), tensors.get(f"{name}.right_trans")
    n1, n2 = (t.shape[0] if t.dim() else 0 for t in (left, right))
    expect_tensor(f"{name}.left_trans", left, (n1, n1), floats)
    expect_tensor(f"{name}.right_trans", right, (n2, n2), floats)
    if n1 * n2 != k:
        raise SavedModelError(f"{name}: transforms {n1} x {n2} do not cover its {k} inputs")
    clip = tensors.get(f"{name}.clip_ratio")
    expect_tensor(f"{name}.clip_ratio", clip, (1,), floats)
    if not 0 < float(clip) <= 1:
        raise SavedModelError(f"tensor {name}.clip_ratio: {float(clip)} is not in (0, 1]")
    transform_spec = TransformSpec(type=KRON_TYPE, config={"n1": n1, "n2": n2,
                                                           "has_right": True, "clip": "none"})
    try:  # build_transform names the missing module type and the plugins that exist
        transform = build_transform(transform_spec, modules, f"{name} ({FLATQUANT})")
    except ValueError as exc:
        raise SavedModelError(str(exc)) from exc
    transform.left.copy_(left.float())
    transform.right.copy_(right.float())
    weights = QuantArgs(bits=4, symmetric=True, granularity="channel")
    activations = QuantArgs(bits=4, symmetric=True, granularity="token", dynamic=True,
                            clip_ratio=float(clip.float()))
    bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
    spec = QuantLinearSpec(in_features=k, out_features=n, bias=bias is not None, n_groups=1,
                           weights=weights, activations=activations,
                           input_transform=transform_spec)
    module = QuantLinear(spec, input_transform=transform, dtype=dtype)
    module.qweight = pack_codes((weight.to(torch.int16) + 8).to(torch.uint8), 4)
    module.scales = scale.float().contiguous()
    module.zeros = torch.full((n, 1), 8, dtype=torch.uint8)
    module.g_idx = group_index(k, weights).to(torch.int32)
    if bias is not None:
        module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
    return module


#: how qcore runs a C8 cache: int8, symmetric, a fixed scale per KV channel
C8_ARGS = QuantArgs(bits=8, symmetric=True, granularity="channel")


def read_kv_scales(model: nn.Module, tensors: SafetensorsFolder
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Each attention module's C8 (key, value) scales, shaped [num_kv_heads, head_dim]."""
    heads, head_dim = kv_layout(model.config)
    floats = (torch.float32, torch.float16, torch.bfloat16)
    out = {}
    for name in attention_modules(model):
        pair = []
        for linear in KV_LINEARS.values():
            scale = tensors.get(f"{name}.{linear}.kv_cache_scale")
            offset = tensors.get(f"{name}.{linear}.kv_cache_offset")
            for tname, t in (("kv_cache_scale", scale), ("kv_cache_offset", offset)):
                expect_tensor(f"{name}.{linear}.{tname}", t, (heads * head_dim,), floats)
            if bool(torch.any(offset != 0)):
                raise SavedModelError(f"tensor {name}.{linear}.kv_cache_offset: nonzero; "
                                      "vllm-ascend applies the scale only (symmetric C8)")
            if not bool(torch.all(scale > 0)):
                raise SavedModelError(f"tensor {name}.{linear}.kv_cache_scale: a scale <= 0")
            pair.append(scale.float().reshape(heads, head_dim))
        out[name] = (pair[0], pair[1])
    return out


class AscendV1Format(Format):
    name = "ascendv1"
    description = "msModelSlim's ascendV1 layout for vllm-ascend / MindIE (W8A16, W4A16, C8, " \
                  "W8A8_DYNAMIC, W8A8, W4A4_FLATQUANT_DYNAMIC)"

    @classmethod
    def check_run(cls, scheme: QuantScheme, online_transforms: bool) -> str | None:
        if online_transforms:
            w, a = scheme.weights, scheme.activations
            if a is None or not (a.symmetric and a.bits == 4 and w.bits == 4
                                 and w.symmetric and w.granularity == "channel"):
                return FLATQUANT_GAP
        if scheme.kv_cache is not None and (problem := _kv_problem(scheme.kv_cache)):
            return f"scheme {scheme.name}: {problem}"
        return None

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return (Path(path) / DESCRIPTION).is_file()

    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel:
        tensors, types, kinds = export_tensors(model)
        linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
        model_type = next(t for t in PRIORITY if t in kinds.values())
        description = {**types, "version": VERSION, "model_quant_type": model_type,
                       "metadata": {}, "group_size": _group_size(linears, kinds),
                       "optional": {}}
        if C8 in types.values():
            description.update({"kv_cache_type": C8, "kv_quant_type": C8})
        max_shard = metadata.get("max_shard_size") or DEFAULT_SHARD
        with atomic_directory(path) as tmp:
            files = write_safetensors(tensors, tmp, max_shard, pattern=WEIGHTS_PATTERN,
                                      index_file=WEIGHTS_INDEX)
            if len(files) == 1:  # one shard is still numbered and indexed (msModelSlim)
                single = WEIGHTS_PATTERN.format(suffix="-00001-of-00001")
                (tmp / files[0]).rename(tmp / single)
                files = [single]
                index = {"metadata": {"total_size": sum(t.numel() * t.element_size()
                                                        for t in tensors.values())},
                         "weight_map": dict.fromkeys(sorted(tensors), single)}
                (tmp / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            (tmp / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
            model.config.save_pretrained(tmp)
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        summary = {"format": self.name, "model_quant_type": model_type, "files": files,
                   "tensors": len(tensors),
                   "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
                   "layers": {n: {"format": kinds[n], "weights": m.spec.weights.describe(),
                                  "activations": m.spec.activations.describe()
                                  if m.spec.activations else None}
                              for n, m in linears.items()},
                   "ignore": sorted(n for n, mod in model.named_modules()
                                    if isinstance(mod, nn.Linear))}
        return SavedModel(path=Path(path), metadata={**metadata, "export": summary})

    def load(self, path: Path, modules: dict[str, type[nn.Module]]
             ) -> tuple[nn.Module, Any, dict]:
        path = Path(path)
        try:
            description = json.loads((path / DESCRIPTION).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SavedModelError(f"{path / DESCRIPTION}: unreadable ({exc})") from exc
        group_size = int(description.get("group_size", 0) or 0)
        kv_type = description.get("kv_cache_type") or description.get("kv_quant_type")
        if kv_type not in (None, C8):
            raise SavedModelError(f"{path}: KV-cache quantization {kv_type} is not read by "
                                  f"qcore ({C8} only)")
        if description.get("fa_quant_type"):
            raise SavedModelError(f"{path}: attention quantization "
                                  f"({description['fa_quant_type']}) is not read by qcore")
        tensors = SafetensorsFolder(path, single="quant_model_weights.safetensors",
                                    index_file=WEIGHTS_INDEX, error=SavedModelError)
        readable = {"W8A16", "W4A16", "W8A8_DYNAMIC", "W8A8", FLATQUANT}

        def make(name: str, linear: nn.Linear, dtype: torch.dtype) -> QuantLinear | None:
            kind = description.get(f"{name}.weight", FLOAT)
            if kind == FLOAT:
                return None
            if kind not in readable:
                raise SavedModelError(f"{name}: ascendV1 type {kind} is not read by qcore "
                                      f"({', '.join(sorted(readable))})")
            if kind == FLATQUANT:
                return load_flatquant_linear(name, linear, tensors, modules, dtype)
            return load_linear(name, linear, kind, tensors, group_size, dtype)

        model, tokenizer, quantized = assemble(path, tensors, make)
        if kv_type == C8:
            attach_static_kv(model, C8_ARGS, read_kv_scales(model, tensors))
        meta = {"format": self.name, "description": {k: v for k, v in description.items()
                                                     if k in ("version", "model_quant_type",
                                                              "group_size", "kv_cache_type")},
                "quantized_layers": layer_specs(quantized)}
        return model, tokenizer, meta


@hookimpl
def qcore_register_formats(register):
    register(AscendV1Format)
