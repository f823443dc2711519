"""compressed-tensors: the on-disk layout llm-compressor writes and vLLM reads (0.20).

Writing (``--format compressed-tensors``): every QuantLinear becomes the tensors
compressed-tensors' own compressor would produce for its scheme, and ``config.json``
gets the ``quantization_config`` its ``ModelCompressor.update_config`` writes:

* weight-only (W4A16, W3A16, W8A16...): format ``pack-quantized``: ``weight_packed``
  int32 (the codes bit-packed densely along input features, :func:`pack_int32`),
  ``weight_scale`` (out, groups), ``weight_shape`` int64 [2], and for asymmetric weights
  ``weight_zero_point`` int32 packed along the output rows;
* weights with activations (W8A8, W4A4): format ``int-quantized``: ``weight`` int8
  signed codes, ``weight_scale``, an int8 ``weight_zero_point`` when asymmetric, and
  ``input_scale`` (+ ``input_zero_point``) for static per-tensor activations;
* layers left in float (``lm_head``, a method's ``skip``) are listed in ``ignore``.

compressed-tensors' codes are signed (``q - 2**(bits-1)``) and its zero points too; the
packed words hold them offset back by ``2**(bits-1)``, i.e. qcore's unsigned codes, so
its dequantization ``(q_s - z_s) * scale`` equals qcore's ``(q - z) * scale`` bit for
bit. Scales are written in float32 (qcore's), whatever the model's dtype.

A static per-tensor KV cache (``W8A8C8-TENSOR``) becomes ``kv_cache_scheme`` (int8,
symmetric, strategy ``tensor``) with each attention module's ``k_scale`` and ``v_scale``
[1] (compressed-tensors quantizes the post-RoPE keys and values with them, as qcore does).

Refused, naming the layer and what the format lacks: online input transforms
(FlatQuant), activation clipping, a permuted ``g_idx`` (act-order without static groups:
compressed-tensors 0.20 removed ``actorder="group"``), per-tensor weights, qcore's
dynamic per-group KV-cache quantization and per-channel static KV scales (W8A8C8: the
kv_cache_scheme holds one scale per tensor or per head).

Reading (``--model DIR`` of a compressed-tensors checkpoint, e.g. llm-compressor's):
the packed codes load into QuantLinear modules as they are, never dequantized to float;
safetensors only (no pickles), no remote code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.errors import SavedModelError
from qcore.hookspecs import hookimpl
from qcore.interfaces import Format, SavedModel
from qcore.io import atomic_directory
from qcore.models.checkpoint import quantization_config
from qcore.quant.kvcache import attach_static_kv, attention_modules, kv_quantizers
from qcore.quant.linear import QuantLinear, QuantLinearSpec
from qcore.quant.packing import pack_codes, pack_int32, unpack_int32
from qcore.quant.qparams import group_index
from qcore.schemes import QuantArgs, QuantScheme
from qcore_builtins.checkpoints import (
    DEFAULT_MAX_SHARD_SIZE,
    NotExpressible,
    SafetensorsFolder,
    assemble,
    expect_tensor,
    layer_specs,
    unique_state_dict,
    write_safetensors,
)

#: the compressed-tensors release whose layout and config this module writes
CT_VERSION = "0.20.0"
QUANT_METHOD = "compressed-tensors"
PACKED, INT = "pack-quantized", "int-quantized"


# ----------------------------------------------------------------------------- writing
def _weight_args(name: str, w: QuantArgs) -> dict[str, Any]:
    if w.granularity not in ("channel", "group"):
        raise NotExpressible(f"{name}: per-{w.granularity} weights; compressed-tensors "
                             "export takes per-channel or grouped weights")
    return {"num_bits": w.bits, "type": "int", "symmetric": w.symmetric,
            "group_size": w.group_size, "strategy": w.granularity, "dynamic": False}


def _activation_args(name: str, a: QuantArgs | None) -> dict[str, Any] | None:
    if a is None:
        return None
    if a.clip_ratio != 1.0:
        raise NotExpressible(f"{name}: activations clipped to {a.clip_ratio} of their range; "
                             "compressed-tensors has no activation clip ratio")
    return {"num_bits": a.bits, "type": "int", "symmetric": a.symmetric, "group_size": None,
            "strategy": a.granularity, "dynamic": a.dynamic}


def _kv_problem(kv: QuantArgs) -> str | None:
    if kv.dynamic:
        return ("the KV cache is quantized dynamically per group at run time; "
                "compressed-tensors stores static KV-cache scales (kv_cache_scheme): use "
                "--scheme W8A8C8-TENSOR, a scheme without KV quantization or the qcore format")
    if kv.granularity != "tensor":
        return (f"static KV scales per {kv.granularity}; compressed-tensors' kv_cache_scheme "
                "holds one scale per tensor (or head): use --scheme W8A8C8-TENSOR, or "
                "--format ascendv1 for per-channel C8")
    return None


def _kv_cache_scheme(model: nn.Module) -> dict[str, Any] | None:
    """The ``kv_cache_scheme`` of a model whose attention modules share one static
    per-tensor KV quantizer; None without KV quantization."""
    quantizers = kv_quantizers(model)
    schemes = set()
    for name, q in quantizers.items():
        if q.spec.keys != q.spec.values or q.spec.keys is None:
            raise NotExpressible(f"{name}: keys and values quantized differently; "
                                 "kv_cache_scheme holds one scheme for both")
        problem = _kv_problem(q.spec.keys)
        if problem:
            raise NotExpressible(f"{name}: {problem}")
        schemes.add(q.spec.keys.bits)
    if not schemes:
        return None
    if len(schemes) > 1:
        raise NotExpressible(f"KV caches of {sorted(schemes)} bits; kv_cache_scheme holds one")
    return {"num_bits": schemes.pop(), "type": "int", "symmetric": True, "group_size": None,
            "strategy": "tensor", "dynamic": False}


def kv_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each attention module's ``k_scale`` and ``v_scale`` [1], float32."""
    out = {}
    for name, q in kv_quantizers(model).items():
        out[f"{name}.k_scale"] = q.key_scale.detach().float().reshape(1).cpu()
        out[f"{name}.v_scale"] = q.value_scale.detach().float().reshape(1).cpu()
    return out


def _check_expressible(name: str, m: QuantLinear) -> None:
    if m.input_transform is not None:
        raise NotExpressible(f"{name}: an online input transform "
                             f"({type(m.input_transform).__name__}, e.g. FlatQuant's); "
                             "compressed-tensors cannot hold it: use the qcore format")
    if not m.contiguous_groups():
        raise NotExpressible(f"{name}: act-order g_idx with permuted groups; "
                             "compressed-tensors 0.20 removed actorder='group': quantize "
                             "GPTQ with static_groups=true (contiguous groups)")


def linear_tensors(name: str, m: QuantLinear, fmt: str) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized linear."""
    w, a = m.spec.weights, m.spec.activations
    half = 2 ** (w.bits - 1)
    codes = m.codes().cpu()
    out: dict[str, torch.Tensor] = {f"{name}.weight_scale": m.scales.detach().float().cpu()}
    if fmt == PACKED:
        out[f"{name}.weight_packed"] = pack_int32(codes, w.bits, dim=1)
        out[f"{name}.weight_shape"] = torch.tensor([m.out_features, m.in_features])
        if not w.symmetric:
            out[f"{name}.weight_zero_point"] = pack_int32(m.zeros.cpu(), w.bits, dim=0)
    else:
        out[f"{name}.weight"] = (codes.to(torch.int16) - half).to(torch.int8)
        if not w.symmetric:
            out[f"{name}.weight_zero_point"] = (m.zeros.cpu().to(torch.int16)
                                                - half).to(torch.int8)
    if a is not None and not a.dynamic:
        out[f"{name}.input_scale"] = m.input_scale.detach().float().reshape(1).cpu()
        if not a.symmetric:
            zero = m.input_zero.detach().cpu().to(torch.int16) - 2 ** (a.bits - 1)
            out[f"{name}.input_zero_point"] = zero.reshape(1).to(torch.int8)
    if m.bias is not None:
        out[f"{name}.bias"] = m.bias.detach().cpu()
    return out


def export_plan(model: nn.Module) -> tuple[dict[str, Any], dict[str, str]]:
    """(quantization_config, format per quantized linear); NotExpressible for a model
    the format cannot hold, naming the first layer that stops it."""
    kv_scheme = _kv_cache_scheme(model)
    groups: dict[str, dict[str, Any]] = {}
    members: dict[str, list[str]] = {}
    formats: dict[str, str] = {}
    ignore = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            _check_expressible(name, module)
            weights = _weight_args(name, module.spec.weights)
            acts = _activation_args(name, module.spec.activations)
            fmt = INT if acts is not None else PACKED
            key = json.dumps([weights, acts], sort_keys=True)
            if key not in groups:
                groups[key] = {"weights": weights, "input_activations": acts,
                               "output_activations": None, "format": fmt}
                members[key] = []
            members[key].append(name)
            formats[name] = fmt
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    if not groups:
        raise NotExpressible("the model has no quantized linear: nothing to export")
    config_groups = {}
    for i, (key, scheme) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else members[key]
        config_groups[f"group_{i}"] = {"targets": targets, **scheme}
    distinct = set(formats.values())
    qconfig = {
        "version": CT_VERSION, "quant_method": QUANT_METHOD, "sparsity_config": {},
        "transform_config": {}, "config_groups": config_groups, "kv_cache_scheme": kv_scheme,
        "format": distinct.pop() if len(distinct) == 1 else "mixed-precision",
        "quantization_status": "compressed", "global_compression_ratio": None,
        "ignore": ignore, "moe_sparsity_config": None,
    }
    return qconfig, formats


#: config.json key of what qcore records beside quantization_config
NOTE_KEY = "qcore"
#: the symmetric activation scale convention of the exported model (QuantArgs.
#: symmetric_range): vLLM's int8 kernels divide max |x| by 127 ("signed", qcore's
#: default), compressed-tensors' own fake quantization by 127.5 ("full"); the config
#: cannot say which, so a qcore export records it and a checkpoint without the note is
#: read with compressed-tensors' convention
ACTIVATION_RANGE_KEY = "activation_symmetric_range"


def _qcore_note(path: Path) -> dict[str, Any]:
    try:
        note = json.loads((Path(path) / "config.json").read_text(encoding="utf-8")).get(
            NOTE_KEY)
    except (OSError, ValueError, AttributeError):
        return {}
    return note if isinstance(note, dict) else {}


# ----------------------------------------------------------------------------- reading
def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.match(pattern[3:], name):
                return True
        elif pattern in (name, type(module).__name__):
            return True
    return False


def _qcore_args(raw: dict[str, Any], where: str, symmetric_range: str = "signed"
                ) -> QuantArgs:
    if raw.get("type", "int") != "int":
        raise SavedModelError(f"{where}: {raw.get('type')} quantization; qcore reads integer "
                              "schemes")
    strategy = raw.get("strategy") or ("group" if raw.get("group_size") else "tensor")
    if strategy not in ("channel", "group", "token", "tensor"):
        raise SavedModelError(f"{where}: strategy {strategy!r} is not supported")
    symmetric = raw.get("symmetric", True)
    return QuantArgs(bits=raw.get("num_bits", 8), symmetric=symmetric,
                     granularity=strategy,
                     group_size=raw.get("group_size") if strategy == "group" else None,
                     dynamic=bool(raw.get("dynamic", False)),
                     symmetric_range=symmetric_range if symmetric else "signed")


def _read_kv_scheme(path: Path, raw: dict[str, Any] | None) -> QuantArgs | None:
    """A kv_cache_scheme qcore runs: static, symmetric, integer, per tensor."""
    if not raw:
        return None
    args = _qcore_args(raw, f"{path}: kv_cache_scheme", "full")
    if args.dynamic or not args.symmetric or args.granularity != "tensor":
        raise SavedModelError(f"{path}: kv_cache_scheme {args.describe()} is not read by qcore "
                              "(static symmetric per-tensor scales only)")
    return args


def _read_kv_scales(model: nn.Module, tensors: SafetensorsFolder
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    floats = (torch.float32, torch.float16, torch.bfloat16)
    scales = {}
    for name in attention_modules(model):
        pair = []
        for role in ("k", "v"):
            t = tensors.get(f"{name}.{role}_scale")
            # one value; llm-compressor writes [1], older releases a 0-dim tensor
            shape = tuple(t.shape) if t.numel() == 1 else (1,)
            expect_tensor(f"{name}.{role}_scale", t, shape, floats)
            pair.append(t)
        scales[name] = (pair[0], pair[1])
    return scales


def _scheme_for(name: str, module: nn.Module, qconfig: dict[str, Any]
                ) -> tuple[dict[str, Any], str] | None:
    if _matches(name, module, qconfig.get("ignore") or []):
        return None
    for group in qconfig["config_groups"].values():
        if _matches(name, module, group.get("targets", [])):
            return group, group.get("format") or qconfig.get("format")
    return None


def load_linear(name: str, linear: nn.Linear, group: dict[str, Any], fmt: str,
                tensors: SafetensorsFolder, dtype: torch.dtype,
                activation_range: str = "full") -> QuantLinear:
    """One QuantLinear from its stored codes, scales and zero points (no float weight).
    ``activation_range``: the symmetric activation scale convention (compressed-tensors'
    own, "full", unless the export recorded qcore's)."""
    if group.get("weights") is None:
        raise SavedModelError(f"{name}: a config group without weights is not supported")
    w = _qcore_args(group["weights"], f"{name} weights")
    acts = group.get("input_activations")
    a = _qcore_args(acts, f"{name} input_activations", activation_range) if acts else None
    n, k = linear.out_features, linear.in_features
    groups = k // w.group_size if w.granularity == "group" else 1
    spec = QuantLinearSpec(in_features=k, out_features=n, bias=linear.bias is not None,
                           n_groups=groups, weights=w, activations=a)
    module = QuantLinear(spec, dtype=dtype)
    half = 2 ** (w.bits - 1)
    if fmt == PACKED:
        packed = tensors.get(f"{name}.weight_packed")
        expect_tensor(f"{name}.weight_packed", packed, (n, -(-k * w.bits // 32)), (torch.int32,))
        codes = unpack_int32(packed, w.bits, k, dim=1)
    elif fmt in (INT, "naive-quantized"):
        signed = tensors.get(f"{name}.weight")
        expect_tensor(f"{name}.weight", signed, (n, k), (torch.int8,))
        codes = (signed.to(torch.int16) + half).to(torch.uint8)
    else:
        raise SavedModelError(f"{name}: compressed-tensors format {fmt!r} is not supported "
                              f"(qcore reads {PACKED} and {INT})")
    scale = tensors.get(f"{name}.weight_scale")
    expect_tensor(f"{name}.weight_scale", scale, (n, groups),
            (torch.float32, torch.float16, torch.bfloat16))
    if w.symmetric:
        zeros = torch.full((n, groups), half, dtype=torch.uint8)
    elif fmt == PACKED:
        zp = tensors.get(f"{name}.weight_zero_point")
        expect_tensor(f"{name}.weight_zero_point", zp, (-(-n * w.bits // 32), groups),
                (torch.int32,))
        zeros = unpack_int32(zp, w.bits, n, dim=0)
    else:
        zp = tensors.get(f"{name}.weight_zero_point")
        expect_tensor(f"{name}.weight_zero_point", zp, (n, groups), (torch.int8, torch.int32))
        zeros = (zp.to(torch.int16) + half).to(torch.uint8)
    module.qweight = pack_codes(codes, w.bits)
    module.scales = scale.float()
    module.zeros = zeros
    module.g_idx = group_index(k, w).to(torch.int32)
    if a is not None and not a.dynamic:
        module.input_scale = tensors.get(f"{name}.input_scale").float().reshape(())
        zero = 2 ** (a.bits - 1)
        if not a.symmetric:
            zero += int(tensors.get(f"{name}.input_zero_point").reshape(()))
        module.input_zero = torch.tensor(float(zero))
    if linear.bias is not None:
        module.bias = nn.Parameter(tensors.get(f"{name}.bias").to(dtype), requires_grad=False)
    return module


class CompressedTensorsFormat(Format):
    name = "compressed-tensors"
    description = ("llm-compressor's layout that vLLM serves (pack-quantized weight-only, "
                   "int-quantized W8A8); also reads such checkpoints")

    @classmethod
    def check_run(cls, scheme: QuantScheme, online_transforms: bool) -> str | None:
        if online_transforms:
            return ("the method keeps online input transforms (FlatQuant's), which "
                    "compressed-tensors cannot hold: save in the qcore format")
        if scheme.kv_cache is not None and (problem := _kv_problem(scheme.kv_cache)):
            return f"scheme {scheme.name}: {problem}"
        act = scheme.activations
        if act is not None and act.clip_ratio != 1.0:
            return (f"scheme {scheme.name} clips activations to {act.clip_ratio} of their "
                    "range; compressed-tensors has no activation clip ratio")
        if scheme.weights.granularity not in ("channel", "group"):
            return (f"scheme {scheme.name} has per-{scheme.weights.granularity} weights; "
                    "the export takes per-channel or grouped weights")
        return None

    @classmethod
    def can_load(cls, path: Path) -> bool:
        qconfig = quantization_config(path)
        return qconfig is not None and qconfig.get("quant_method") == QUANT_METHOD

    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel:
        qconfig, formats = export_plan(model)
        modules = dict(model.named_modules())
        kv_modules = {f"{n}.qcore_kv" for n in kv_quantizers(model)}
        tensors = unique_state_dict(model, skip=set(formats) | kv_modules)
        for name, fmt in formats.items():
            tensors.update(linear_tensors(name, modules[name], fmt))
        tensors.update(kv_tensors(model))
        max_shard = metadata.get("max_shard_size") or DEFAULT_MAX_SHARD_SIZE
        ranges = {m.spec.activations.symmetric_range for n in formats
                  if (m := modules[n]).spec.activations is not None
                  and m.spec.activations.symmetric}
        if len(ranges) > 1:
            raise NotExpressible("symmetric activations with both scale conventions "
                                 "(symmetric_range signed and full) in one model")
        with atomic_directory(path) as tmp:
            files = write_safetensors(tensors, tmp, max_shard)
            model.config.save_pretrained(tmp)
            config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
            config["quantization_config"] = qconfig
            if ranges:  # outside quantization_config, which vLLM validates
                config[NOTE_KEY] = {ACTIVATION_RANGE_KEY: ranges.pop()}
            (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True)
                                             + "\n")
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
        summary = {
            "format": self.name, "compressed_tensors_version": CT_VERSION,
            "files": files, "tensors": len(tensors),
            "bytes": sum(t.numel() * t.element_size() for t in tensors.values()),
            "layers": {name: {"format": fmt, "weights": modules[name].spec.weights.describe(),
                              "activations": modules[name].spec.activations.describe()
                              if modules[name].spec.activations else None}
                       for name, fmt in formats.items()},
            "ignore": qconfig["ignore"],
        }
        return SavedModel(path=Path(path), metadata={**metadata, "export": summary})

    def load(self, path: Path, modules: dict[str, type[nn.Module]]
             ) -> tuple[nn.Module, Any, dict]:
        path = Path(path)
        qconfig = quantization_config(path) or {}
        kv_args = _read_kv_scheme(path, qconfig.get("kv_cache_scheme"))
        if qconfig.get("transform_config"):
            raise SavedModelError(f"{path}: transform_config (online rotations) is not "
                                  "supported by qcore's reader")
        if not qconfig.get("config_groups"):
            raise SavedModelError(f"{path}: quantization_config has no config_groups")
        tensors = SafetensorsFolder(path, error=SavedModelError)
        recorded = _qcore_note(path).get(ACTIVATION_RANGE_KEY)
        activation_range = recorded if recorded in ("signed", "full") else "full"

        def make(name: str, linear: nn.Linear, dtype: torch.dtype) -> QuantLinear | None:
            found = _scheme_for(name, linear, qconfig)
            if found is None:
                return None
            group, fmt = found
            return load_linear(name, linear, group, fmt, tensors, dtype, activation_range)

        model, tokenizer, quantized = assemble(path, tensors, make)
        if kv_args is not None:
            attach_static_kv(model, kv_args, _read_kv_scales(model, tensors))
        meta = {"format": self.name, "quantization_config": qconfig,
                "quantized_layers": layer_specs(quantized)}
        return model, tokenizer, meta


@hookimpl
def qcore_register_formats(register):
    register(CompressedTensorsFormat)
