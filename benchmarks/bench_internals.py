"""Costs of three internal choices, each printed as a table:

    python benchmarks/bench_internals.py [--threads 2] [--windows 4]

dequant: QuantLinear's per-call dequantization (qcore.quant.qparams.dequantize_weight) on
  SmolLM2's linear shapes, contiguous groups (broadcast) and an act-order g_idx (gather),
  against the per-column gather formula used for both before.
hessian: GPTQ's HessianAccumulator, full X^T X (blocks=1) against the upper block rows
  (blocks=4, the default), 2048 tokens per update.
eval: perplexity of SmolLM2-135M RTN W4A16 g64 on the first --windows windows of the
  pydoc tail, dequantizing per call (the default) or inside cached_dequantization(), with
  the float32 bytes the cache holds.
"""

from __future__ import annotations

import time
from functools import partial

import _common as common


def _best_ms(fn, repeats: int = 20) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _gather_dequantize(codes, scale, zero, idx):
    """The per-column formula: every column's scale and zero gathered from its group."""
    return (codes.float() - zero[:, idx]) * scale[:, idx]


def dequant() -> None:
    import torch

    from qcore.quant.qparams import dequantize_weight

    print("dequantization per call, ms (best of 20)")
    print(f"{'out x in':<12} {'g_idx':<10} {'per-column gather':>18} {'qcore':>8}")
    gen = torch.Generator().manual_seed(0)
    for rows, cols in ((1536, 576), (576, 1536), (576, 576)):
        codes = torch.randint(0, 16, (rows, cols), generator=gen, dtype=torch.uint8)
        scale = torch.rand(rows, cols // 64, generator=gen)
        zero = torch.randint(0, 16, (rows, cols // 64), generator=gen).float()
        natural = torch.arange(cols) // 64
        for label, g_idx in (("natural", natural),
                             ("act-order", natural[torch.randperm(cols, generator=gen)])):
            gather = partial(_gather_dequantize, codes, scale, zero, g_idx.long())
            ours = partial(dequantize_weight, codes, scale, zero, g_idx.int())
            assert torch.equal(gather(), ours())
            print(f"{f'{rows}x{cols}':<12} {label:<10} {_best_ms(gather):>18.3f} "
                  f"{_best_ms(ours):>8.3f}")


def hessian() -> None:
    import torch

    from qcore.quant.hessian import HessianAccumulator

    print("\nHessian update, 2048 tokens, ms (best of 20)")
    print(f"{'inputs':<8} {'full (blocks=1)':>16} {'upper (blocks=4)':>17}")
    for cols in (576, 1536):
        x = torch.randn(2048, cols)
        times = []
        for blocks in (1, 4):
            acc = HessianAccumulator(cols, blocks=blocks)
            times.append(_best_ms(partial(acc.add, x)))
        print(f"{cols:<8} {times[0]:>16.2f} {times[1]:>17.2f}")


def evaluation(windows: int) -> None:
    from qcore import api
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec
    from qcore.quant.linear import QuantLinear, cached_dequantization

    config = RunConfig(model="smollm2", method="rtn", scheme="W4A16", group_size=64,
                       calibration=CalibrationConfig(data=DataSpec(source="pydoc", part="head"),
                                                     samples=4, seq_len=512))
    result = api.quantize(config, progress=False)
    tail = DataSpec(source="pydoc", part="tail")

    def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        ppl = api.perplexity(result.model, result.tokenizer, tail, seq_len=512,
                             windows=windows)
        return ppl, time.perf_counter() - t0

    print(f"\nSmolLM2-135M RTN W4A16 g64, perplexity on {windows} pydoc-tail windows")
    print(f"{'mode':<28} {'ppl':>8} {'seconds':>8} {'float cache MB':>15}")
    run()  # warm-up
    ppl, seconds = run()
    print(f"{'dequantize per call':<28} {ppl:>8.3f} {seconds:>8.2f} {0:>15.0f}")
    with cached_dequantization():
        ppl, seconds = run()
        cache = sum(m._dequant_cache.numel() * 4 for m in result.model.modules()
                    if isinstance(m, QuantLinear) and m._dequant_cache is not None)
    print(f"{'cached_dequantization()':<28} {ppl:>8.3f} {seconds:>8.2f} {cache / 2**20:>15.0f}")


def main() -> None:
    p = common.benchmark_parser(__doc__, wrap_flag_help=True)
    common.add_threads_flag(p)
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--parts", default="dequant,hessian,eval")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    parts = a.parts.split(",")
    if "dequant" in parts:
        dequant()
    if "hessian" in parts:
        hessian()
    if "eval" in parts:
        evaluation(a.windows)


if __name__ == "__main__":
    main()
