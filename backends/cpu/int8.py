"""A real W8A8 integer linear for x86 CPUs: int8 activations x int8 weights -> int32.

Semantics (identical to :meth:`QuantLinear.reference_forward` up to float rounding of the
result): activations are quantized symmetrically, per token at run time
(``scale_t = absmax_t / 127``, ``q = round(x / scale_t)``) or per tensor with the layer's
calibrated static scale; weights are int8 per output channel, symmetric; the integer
product ``acc = q_x @ q_w^T`` (exact int32) is scaled by ``scale_t * scale_w[n]`` and the
bias added.

Three integer GEMMs available in stock torch on x86 are implemented (pick with
``QCORE_CPU_INT8_ENGINE`` or :data:`DEFAULT_ENGINE`; ``auto``, the default, uses fbgemm for
calls with at most :data:`AUTO_MAX_SMALL_M` tokens and oneDNN above, as measured fastest):

* ``onednn``: ``torch.ops.onednn.qlinear_pointwise`` (oneDNN u8 x s8 with VNNI/AMX). oneDNN
  takes asymmetric u8 activations, so the symmetric per-token codes are shifted by 128
  and passed with zero point 128 and activation scale 1; oneDNN subtracts the zero point's
  contribution exactly in int32 and applies the per-channel weight scales; the per-token
  scale is applied to the float32 result. (s8 activations are accepted by the op but run
  a reference loop about 1000x slower.)
* ``fbgemm``: ``quantized::linear_with_input_q_dq_qweight_dq_output_fp32`` with per-channel
  packed weights. It quantizes a float input itself with one scale and zero point, so it
  receives the already-rounded codes ``round(x / scale_t)`` as floats with scale 1 and zero
  point 128 (re-rounding integers is exact, so the per-token codes survive unchanged).
* ``int_mm``: ``torch._int_mm`` (s8 x s8 -> s32), the slow reference on CPUs.

CPUs without VNNI (AVX2 only, e.g. older AMD EPYC): u8 x s8 GEMMs multiply with
``vpmaddubsw``, which adds adjacent u8 x s8 products into a *saturating* int16, so codes
near 255 x 127 overflow (measured: errors of 6e4 integer units on random codes). There the
``onednn`` GEMM splits the u8 codes into two 4-bit halves (``x = 16 hi + lo``, each product
pair at most 2 x 15 x 127) and combines ``16 G(hi) + G(lo) - 128 sum_k w`` exactly, at about
twice the cost; ``auto`` uses it for every M, and ``fbgemm`` (same saturation, no way around
it) is refused.

Weights are packed once per layer and kept in a weak cache (keyed by the layer, invalidated
when its codes or scales change), so a deep copy of a model never carries packed blobs.
"""

from __future__ import annotations

import os
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from qcore.profiling import ACTIVATION_QUANT, INT_GEMM, kernel_range
from qcore.quant.linear import QuantLinear

ENGINES = ("auto", "onednn", "fbgemm", "int_mm")
#: measured fastest on the development CPU (see docs/methods/smoothquant.md): fbgemm has
#: the lower fixed cost per call (decode), oneDNN the faster GEMM for many tokens (prefill)
DEFAULT_ENGINE = "auto"
#: "auto" uses fbgemm up to this many tokens per call, oneDNN above
AUTO_MAX_SMALL_M = 16


def cpu_has_vnni() -> bool:
    """Whether u8 x s8 products accumulate without int16 saturation (AVX512-VNNI/AVX-VNNI)."""
    probe = getattr(torch.cpu, "_is_vnni_supported", None)
    if probe is not None:
        return bool(probe())
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


HAS_VNNI = cpu_has_vnni()

_cache: weakref.WeakKeyDictionary[QuantLinear, dict[str, tuple[tuple, object]]] = (
    weakref.WeakKeyDictionary()
)


def supports(module: QuantLinear) -> bool:
    """Whether ``module`` is W8A8 symmetric (per-channel weights, per-token dynamic or
    per-tensor static activations) on the CPU without an online input transform."""
    if not isinstance(module, QuantLinear):
        return False
    w, a = module.spec.weights, module.spec.activations
    if a is None or w.bits != 8 or a.bits != 8 or not w.symmetric or not a.symmetric:
        return False
    if w.granularity not in ("channel", "tensor"):
        return False
    if a.granularity == "token" and (not a.dynamic or a.symmetric_range != "signed"):
        return False  # the kernel's per-token scale is max |x| / 127
    if a.granularity == "tensor" and module.input_scale is None:
        return False
    return module.qweight.device.type == "cpu" and module.input_transform is None


# ----------------------------------------------------------------------------- activations
def quantize_tokens(x: torch.Tensor, clip_ratio: float = 1.0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per-token codes (float, integral, in [-127, 127]) and scales (M, 1),
    bit-identical to the reference fake quantization (there the absmax is
    max(|min(x_min, 0)|, max(x_max, 0)) after scaling both by clip_ratio, which equals
    max |x| * clip_ratio)."""
    absmax = x.abs().amax(dim=-1, keepdim=True)
    if clip_ratio != 1.0:
        absmax = absmax * clip_ratio
    scale = absmax.clamp_(min=1e-5).div_(127)
    codes = torch.div(x, scale).round_().clamp_(-128, 127)
    return codes, scale


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes with a static per-tensor scale (zero point 128 in qcore's
    unsigned convention), and the scale broadcast per token."""
    codes = torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero
    return codes, scale.reshape(1, 1).expand(x.shape[0], 1)


def _activation_codes(module: QuantLinear, x2: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    act = module.spec.activations
    assert act is not None
    if act.granularity == "token":
        return quantize_tokens(x2, act.clip_ratio)
    return quantize_static(x2, module.input_scale.float(), module.input_zero.float())


# ----------------------------------------------------------------------------- weights
def weight_int8(module: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed int8 weight codes (out, in) and float32 per-output-channel scales (out,)."""
    codes = module.codes().to(torch.int16) - module.zeros[:, :1].to(torch.int16)
    return codes.to(torch.int8).contiguous(), module.scales[:, 0].float().contiguous()


def _packed(module: QuantLinear, engine: str, build: Callable[[], object]) -> object:
    key = (module.qweight.data_ptr(), module.qweight._version, module.scales._version,
           module.scales.data_ptr())
    per_module = _cache.setdefault(module, {})
    hit = per_module.get(engine)
    if hit is None or hit[0] != key:
        hit = (key, build())
        per_module[engine] = hit
    return hit[1]


def _onednn_weight(module: QuantLinear
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Packed weight, its scales, zero points, and ``128 sum_k w`` (float64) for the split."""
    wq, ws = weight_int8(module)
    packed = torch.ops.onednn.qlinear_prepack(wq, None)
    shift = wq.sum(dim=1, dtype=torch.int64).double().mul_(128)
    return packed, ws, torch.zeros(ws.numel(), dtype=torch.long), shift


def _fbgemm_weight(module: QuantLinear) -> object:
    wq, ws = weight_int8(module)
    with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm needs one
        warnings.simplefilter("ignore", UserWarning)
        qw = torch._make_per_channel_quantized_tensor(
            wq, ws.double(), torch.zeros(ws.numel(), dtype=torch.long), 0)
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = "fbgemm"
    try:
        return torch.ops.quantized.linear_prepack(qw, None)
    finally:
        torch.backends.quantized.engine = previous


def _int_mm_weight(module: QuantLinear) -> tuple[torch.Tensor, torch.Tensor]:
    wq, ws = weight_int8(module)
    return wq.t().contiguous(), ws


# ----------------------------------------------------------------------------- GEMMs
def int8_gemm_onednn(module: QuantLinear, xu8: torch.Tensor) -> torch.Tensor:
    """(M, K) u8 codes (zero point 128) -> float32 ``(q_x @ q_w^T) * scale_w``, u8s8s32."""
    packed, ws, wz, shift = _packed(module, "onednn", lambda: _onednn_weight(module))
    if HAS_VNNI:
        return torch.ops.onednn.qlinear_pointwise(xu8, 1.0, 128, packed, ws, wz, None, 1.0, 0,
                                                  torch.float32, "none", [], "")
    ones = torch.ones_like(ws)

    def gemm(codes: torch.Tensor) -> torch.Tensor:  # exact integers in float32 below 2^24
        return torch.ops.onednn.qlinear_pointwise(codes, 1.0, 0, packed, ones, wz, None, 1.0,
                                                  0, torch.float32, "none", [], "").double()

    acc = gemm(xu8 >> 4).mul_(16).add_(gemm(xu8 & 15)).sub_(shift)
    return acc.float().mul_(ws)


def int8_gemm_fbgemm(module: QuantLinear, codes: torch.Tensor) -> torch.Tensor:
    packed = _packed(module, "fbgemm", lambda: _fbgemm_weight(module))
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(
        codes.contiguous(), 1.0, 128, packed)


def int8_gemm_int_mm(module: QuantLinear, xs8: torch.Tensor) -> torch.Tensor:
    wt, ws = _packed(module, "int_mm", lambda: _int_mm_weight(module))
    return torch._int_mm(xs8, wt).float() * ws


GEMMS: dict[str, Callable[[QuantLinear, torch.Tensor], torch.Tensor]] = {
    "onednn": int8_gemm_onednn,
    "fbgemm": int8_gemm_fbgemm,
    "int_mm": int8_gemm_int_mm,
}


#: how each GEMM takes the activation codes (part of the activation quantization cost)
INPUT_FORMAT: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "onednn": lambda codes: codes.add_(128).to(torch.uint8),
    "fbgemm": lambda codes: codes,
    "int_mm": lambda codes: codes.to(torch.int8),
}


def _make_kernel(engine: str) -> Callable[[QuantLinear, torch.Tensor], torch.Tensor]:
    if engine == "fbgemm" and not HAS_VNNI:
        def refused(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("the fbgemm int8 engine saturates int16 sums on CPUs without "
                               "VNNI; use QCORE_CPU_INT8_ENGINE=auto or onednn")
        return refused

    def kernel(module: QuantLinear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).float()
        name = engine
        if name == "auto":
            small = x2.shape[0] <= AUTO_MAX_SMALL_M and HAS_VNNI
            name = "fbgemm" if small else "onednn"
        with kernel_range(ACTIVATION_QUANT):
            codes, token_scale = _activation_codes(module, x2)
        with kernel_range(INT_GEMM):
            y = GEMMS[name](module, INPUT_FORMAT[name](codes)).mul_(token_scale)
        if module.bias is not None:
            y = y + module.bias.float()
        return y.reshape(*shape[:-1], module.out_features).to(x.dtype)

    kernel.__name__ = f"w8a8_int8_{engine}"
    kernel.__qualname__ = kernel.__name__
    return kernel


KERNELS = {engine: _make_kernel(engine) for engine in ENGINES}


def selected_engine() -> str:
    engine = os.environ.get("QCORE_CPU_INT8_ENGINE", DEFAULT_ENGINE)
    if engine not in KERNELS:
        raise ValueError(f"QCORE_CPU_INT8_ENGINE={engine!r}; choose one of {', '.join(ENGINES)}")
    return engine
