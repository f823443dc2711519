"""QuantLinear -> torch_npu kernel arguments, and the kernels themselves.

Mapping from qcore's storage (unsigned codes ``q``, ``w = (q - zero) * scale``, weight
``(out, in)``) to the layouts the Ascend operators take (REFERENCE.md, vllm-ascend):

* signed codes: ``s = q - 2**(bits-1)`` so int8 / int4 values are in the signed range;
  then ``w = (s + offset) * scale`` with ``offset = 2**(bits-1) - zero``
  (``npu_weight_quant_batchmatmul`` ADDS its ``antiquant_offset``);
* weights transposed to ``(K, N) = (in, out)``; per-group scales/offsets ``(K/G, N)``;
* int4 weights packed eight signed nibbles per int32 by ``npu_convert_weight_to_int4pack``;
* GPTQ act-order (a ``g_idx`` that is not sorted) is handled by permuting the weight rows
  so that groups are contiguous and gathering the activation columns the same way.

Each kernel prepares its tensors once per layer (cached on the module).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch

from qcore.profiling import ACTIVATION_QUANT, INT_GEMM, kernel_range
from qcore.quant.linear import QuantLinear


def torch_npu():
    """The torch_npu module, imported on first use (never at qcore import time)."""
    return importlib.import_module("torch_npu")


@dataclass
class PreparedWeight:
    weight: torch.Tensor          # int8 (K, N), or int4-packed int32 (K, N / 8)
    scale: torch.Tensor           # (N,) per channel, or (K / G, N) per group
    offset: torch.Tensor | None   # same shape as scale; None when all zero
    group_size: int               # 0 = per channel
    perm: torch.Tensor | None     # input-column gather for act-order, else None


def _group_order(module: QuantLinear) -> tuple[torch.Tensor | None, int]:
    g_idx = module.g_idx.long()
    n_groups = module.spec.n_groups
    if n_groups == 1:
        return None, 0
    group_size = module.in_features // n_groups
    perm = torch.argsort(g_idx, stable=True)
    if torch.equal(perm, torch.arange(perm.numel(), device=perm.device)):
        return None, group_size
    return perm, group_size


def prepare_weight(module: QuantLinear) -> PreparedWeight:
    """Signed, transposed, (packed) weight and its dequantization parameters."""
    bits = module.spec.weights.bits
    half = 2 ** (bits - 1)
    codes = module.codes().to(torch.int16)                 # (N, K) unsigned
    perm, group_size = _group_order(module)
    if perm is not None:
        codes = codes[:, perm]
    signed = (codes - half).T.contiguous()                 # (K, N), values in signed range
    offset = (half - module.zeros.to(torch.float32)).T.contiguous()   # (groups, N)
    scale = module.scales.T.contiguous().float()                      # (groups, N)
    if group_size == 0:
        scale, offset = scale[0], offset[0]
    if bits <= 4:
        weight = torch_npu().npu_convert_weight_to_int4pack(signed.to(torch.int32))
    else:
        weight = signed.to(torch.int8)
    has_offset = bool(torch.any(offset != 0))
    return PreparedWeight(weight=weight, scale=scale, offset=offset if has_offset else None,
                          group_size=group_size, perm=perm)


def _prepared(module: QuantLinear) -> PreparedWeight:
    cached = getattr(module, "_npu_prepared", None)
    if cached is None:
        cached = prepare_weight(module)
        module._npu_prepared = cached
    return cached


def weight_only_kernel(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """W8A16 / W4A16: ``npu_weight_quant_batchmatmul`` (dequantization fused in the GEMM)."""
    p = _prepared(module)
    if module.input_transform is not None:
        x = module.input_transform(x)
    if p.perm is not None:
        x = x.index_select(-1, p.perm)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    scale = p.scale.to(x.dtype)
    offset = None if p.offset is None else p.offset.to(x.dtype)
    y = torch_npu().npu_weight_quant_batchmatmul(
        x2, p.weight, antiquant_scale=scale, antiquant_offset=offset, bias=module.bias,
        antiquant_group_size=p.group_size)
    return y.reshape(*shape[:-1], -1)


def w8a8_dynamic_kernel(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    """W8A8 dynamic: ``npu_dynamic_quant`` (symmetric per token) then ``npu_quant_matmul``
    with the per-channel weight scale and the per-token activation scale."""
    p = _prepared(module)
    npu = torch_npu()
    if module.input_transform is not None:
        x = module.input_transform(x)
    shape = x.shape
    with kernel_range(ACTIVATION_QUANT):
        x_q, x_scale = npu.npu_dynamic_quant(x.reshape(-1, shape[-1]))
    with kernel_range(INT_GEMM):
        y = npu.npu_quant_matmul(x_q, p.weight, p.scale, pertoken_scale=x_scale.reshape(-1),
                                 bias=None, output_dtype=x.dtype)
    if module.bias is not None:
        y = y + module.bias
    return y.reshape(*shape[:-1], -1)


def supports_weight_only(module: QuantLinear) -> bool:
    return module.spec.activations is None and module.spec.weights.bits in (4, 8) and (
        module.spec.weights.bits == 8 or module.out_features % 8 == 0)


def supports_w8a8_dynamic(module: QuantLinear) -> bool:
    w, a = module.spec.weights, module.spec.activations
    return (a is not None and a.bits == 8 and a.symmetric and a.granularity == "token"
            and a.symmetric_range == "signed"  # npu_dynamic_quant: max |x| / 127
            and w.bits == 8 and w.symmetric and module.spec.n_groups == 1)
