"""Reading the GPTQ and AWQ checkpoints GPTQModel/AutoGPTQ and AutoAWQ publish.

Both store, per quantized linear with K inputs and N outputs, int32 words of packed
unsigned codes, fp16 ``scales`` (groups, N) and packed zero points ``qzeros``
(groups, N * bits / 32), and dequantize ``(q - z) * scale``; ``config.json`` carries
``quantization_config`` with ``quant_method`` ``gptq`` or ``awq``.

* GPTQ (``quant_method: gptq``; 2, 4 or 8 bits): ``qweight`` (K * bits / 32, N) packs
  32 / bits consecutive input rows per word, lowest bits first; ``qzeros`` packs
  consecutive output columns the same way; ``g_idx`` (K) maps each input to its group
  (act-order). ``checkpoint_format: gptq`` (AutoGPTQ, the v1 default) stores every zero
  point minus one, so the reader adds one back (modulo 2**bits: v1's stored -1 of a zero
  point 0 wrapped around); ``gptq_v2`` (GPTQModel) stores them as they are.
* AWQ (``quant_method: awq``, ``version: gemm``; 4 bits): ``qweight`` (K, N / 8) packs
  eight output columns per word in the order 0, 2, 4, 6, 1, 3, 5, 7 (AutoAWQ's GEMM
  layout); ``qzeros`` likewise; groups are contiguous; no zero-point offset.

The codes load into QuantLinear modules as they are (no float weight is built);
everything else loads from the same safetensors, never from pickles.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from qcore.errors import SavedModelError
from qcore.hookspecs import hookimpl
from qcore.interfaces import Format, SavedModel
from qcore.models.checkpoint import quantization_config
from qcore.quant.linear import QuantLinear, QuantLinearSpec
from qcore.quant.packing import pack_codes, unpack_int32
from qcore.quant.qparams import group_index
from qcore.schemes import QuantArgs, QuantScheme
from qcore_builtins.checkpoints import (
    SafetensorsFolder,
    assemble,
    expect_tensor,
    layer_specs,
)

#: AutoAWQ GEMM: word slot i of a pack of eight holds output column AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def awq_columns(packed_codes: torch.Tensor) -> torch.Tensor:
    """Codes unpacked slot by slot (K, N) back in output-column order."""
    n = packed_codes.shape[1]
    column = (torch.arange(n) // 8) * 8 + torch.tensor(AWQ_ORDER).repeat(n // 8)
    out = torch.empty_like(packed_codes)
    out[:, column] = packed_codes
    return out


def _qconfig(path: Path, method: str) -> dict[str, Any] | None:
    qconfig = quantization_config(path)
    return qconfig if qconfig is not None and qconfig.get("quant_method") == method else None


def _not_converted(name: str, qconfig: dict[str, Any]) -> bool:
    skip = qconfig.get("modules_to_not_convert") or []
    return name == "lm_head" or name.endswith(".lm_head") or any(s in name for s in skip)


class _CheckpointReader(Format):
    """A format qcore reads but does not write (it writes compressed-tensors, which vLLM
    serves for GPTQ and AWQ models alike)."""

    method: str

    @classmethod
    def can_load(cls, path: Path) -> bool:
        return _qconfig(Path(path), cls.method) is not None

    @classmethod
    def check_run(cls, scheme: QuantScheme, online_transforms: bool) -> str | None:
        return (f"qcore reads {cls.method} checkpoints but does not write them; save in the "
                "qcore format or export --format compressed-tensors (vLLM serves it)")

    def save(self, model: nn.Module, tokenizer: Any, path: Path, metadata: dict[str, Any]
             ) -> SavedModel:
        raise ValueError(self.check_run(None, False))  # type: ignore[arg-type]

    def settings(self, path: Path, qconfig: dict[str, Any]) -> tuple[int, int | None, bool]:
        """(bits, group size or None for per channel, symmetric)."""
        raise NotImplementedError

    def linear(self, name: str, linear: nn.Linear, tensors: SafetensorsFolder,
               qconfig: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        raise NotImplementedError

    def load(self, path: Path, modules: dict[str, type[nn.Module]]
             ) -> tuple[nn.Module, Any, dict]:
        path = Path(path)
        qconfig = _qconfig(path, self.method)
        assert qconfig is not None
        tensors = SafetensorsFolder(path, error=SavedModelError)

        def make(name: str, linear: nn.Linear, dtype: torch.dtype) -> QuantLinear | None:
            if _not_converted(name, qconfig) or f"{name}.qweight" not in tensors:
                return None
            return self.linear(name, linear, tensors, qconfig, dtype)

        model, tokenizer, quantized = assemble(path, tensors, make)
        meta = {"format": self.name, "quantization_config": qconfig,
                "quantized_layers": layer_specs(quantized)}
        return model, tokenizer, meta

    @staticmethod
    def build(linear: nn.Linear, weights: QuantArgs, codes: torch.Tensor,
              scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
        n, k = linear.out_features, linear.in_features
        spec = QuantLinearSpec(in_features=k, out_features=n, bias=bias is not None,
                               n_groups=scales.shape[0], weights=weights)
        module = QuantLinear(spec, dtype=dtype)
        module.qweight = pack_codes(codes.t().contiguous(), weights.bits)
        module.scales = scales.t().float().contiguous()
        module.zeros = zeros.t().to(torch.uint8).contiguous()
        module.g_idx = g_idx.to(torch.int32)
        if bias is not None:
            module.bias = nn.Parameter(bias.to(dtype), requires_grad=False)
        return module


def _grouping(size: int, in_features: int) -> tuple[int | None, int]:
    """(group size or None for per channel, number of groups): -1, 0 or a size covering
    every input mean one group per output channel."""
    group = None if size in (-1, 0) or size >= in_features else size
    return group, in_features // group if group else 1


def _weights(bits: int, group_size: int | None, symmetric: bool) -> QuantArgs:
    if group_size is None:
        return QuantArgs(bits=bits, symmetric=symmetric, granularity="channel")
    return QuantArgs(bits=bits, symmetric=symmetric, granularity="group",
                     group_size=group_size)


class GPTQCheckpointFormat(_CheckpointReader):
    name = "gptq"
    method = "gptq"
    description = "reads GPTQModel / AutoGPTQ checkpoints (qweight, qzeros, scales, g_idx)"

    def linear(self, name: str, linear: nn.Linear, tensors: SafetensorsFolder,
               qconfig: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        bits = int(qconfig.get("bits", 4))
        if bits not in (2, 4, 8):
            raise SavedModelError(f"{name}: {bits}-bit GPTQ packing is not supported (2, 4, "
                                  "8 bits)")
        fmt = qconfig.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise SavedModelError(f"{name}: checkpoint_format {fmt!r} is not supported "
                                  "(gptq, gptq_v2)")
        n, k = linear.out_features, linear.in_features
        group, groups = _grouping(int(qconfig.get("group_size", 128)), k)
        qweight = tensors.get(f"{name}.qweight")
        expect_tensor(f"{name}.qweight", qweight, (k * bits // 32, n), (torch.int32,))
        qzeros = tensors.get(f"{name}.qzeros")
        expect_tensor(f"{name}.qzeros", qzeros, (groups, n * bits // 32), (torch.int32,))
        scales = tensors.get(f"{name}.scales")
        expect_tensor(f"{name}.scales", scales, (groups, n), FLOATS)
        codes = unpack_int32(qweight, bits, k, dim=0)            # (K, N)
        zeros = unpack_int32(qzeros, bits, n, dim=1).to(torch.int16)  # (groups, N)
        if fmt == "gptq":  # v1 stores z - 1
            zeros = (zeros + 1) % 2**bits
        weights = _weights(bits, group, bool(qconfig.get("sym", True)))
        if f"{name}.g_idx" in tensors:
            g_idx = tensors.get(f"{name}.g_idx")
            expect_tensor(f"{name}.g_idx", g_idx, (k,), (torch.int32, torch.int64))
            if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= groups):
                raise SavedModelError(f"tensor {name}.g_idx: group indices outside "
                                      f"[0, {groups})")
        else:
            g_idx = group_index(k, weights)
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        return self.build(linear, weights, codes, scales, zeros, g_idx, bias, dtype)


class AWQCheckpointFormat(_CheckpointReader):
    name = "awq"
    method = "awq"
    description = "reads AutoAWQ GEMM checkpoints (qweight, qzeros, scales)"

    def linear(self, name: str, linear: nn.Linear, tensors: SafetensorsFolder,
               qconfig: dict[str, Any], dtype: torch.dtype) -> QuantLinear:
        bits = int(qconfig.get("bits", qconfig.get("w_bit", 4)))
        version = str(qconfig.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm":
            raise SavedModelError(f"{name}: AWQ {version} with {bits} bits is not supported "
                                  "(4-bit GEMM)")
        n, k = linear.out_features, linear.in_features
        group, groups = _grouping(
            int(qconfig.get("group_size", qconfig.get("q_group_size", 128))), k)
        qweight = tensors.get(f"{name}.qweight")
        expect_tensor(f"{name}.qweight", qweight, (k, n // 8), (torch.int32,))
        qzeros = tensors.get(f"{name}.qzeros")
        expect_tensor(f"{name}.qzeros", qzeros, (groups, n // 8), (torch.int32,))
        scales = tensors.get(f"{name}.scales")
        expect_tensor(f"{name}.scales", scales, (groups, n), FLOATS)
        codes = awq_columns(unpack_int32(qweight, 4, n, dim=1))
        zeros = awq_columns(unpack_int32(qzeros, 4, n, dim=1))
        if not qconfig.get("zero_point", True):
            zeros = torch.full_like(zeros, 8)
        weights = _weights(4, group, not qconfig.get("zero_point", True))
        bias = tensors.get(f"{name}.bias") if f"{name}.bias" in tensors else None
        return self.build(linear, weights, codes, scales, zeros, group_index(k, weights),
                          bias, dtype)


@hookimpl
def qcore_register_formats(register):
    register(GPTQCheckpointFormat)
    register(AWQCheckpointFormat)
