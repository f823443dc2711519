"""Generation speed on SmolLM2-135M: float32 vs W4A16 (reference path, dequantizing every
call or keeping the dequantized weights) vs W8A8 (the real int8 CPU kernel), batch 1 and 16.

    python benchmarks/bench_generation.py [--new-tokens 32] [--batches 1 16] [--threads 2]

Each row runs in its own process (peak RSS from wait4, model load included). Greedy
decoding from pydoc prompts, ``--new-tokens`` new tokens per prompt (min = max, so every
row generates the same count); tokens/s counts generated tokens over the generate calls,
best of ``--repeats`` (the W4A16 "cached" row keeps one cache over the repeats, as a
generation run does; its first repeat also pays the one-time dequantization: "first s").
W4A16: RTN asymmetric g64; W8A8: RTN symmetric per-channel weights,
per-token dynamic activations (RTN weights need no calibration: 1 window)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

HERE = Path(__file__).resolve()
COLUMNS = ("model", "batch", "tokens/s", "vs fp32", "first s", "best s", "peak RSS MB",
           "weights MB", "dequant cache MB", "kernels")

ROWS = {
    "fp32": (None, None, False),
    "W4A16 per call": ("W4A16", 64, False),
    "W4A16 cached": ("W4A16", 64, True),
    "W8A8 int8": ("W8A8", None, False),
}


def one(a: argparse.Namespace) -> dict:
    """Worker: one row (--one) at one batch size (--batch), in this process."""
    from pydoc_data.topics import topics

    import torch

    from qcore import api
    from qcore.config import CalibrationConfig, RunConfig
    from qcore.interfaces import DataSpec
    from qcore.quant.linear import QuantLinear, cached_dequantization

    row, batch, new_tokens, repeats = a.one, int(a.batch), a.new_tokens, a.repeats
    torch.set_num_threads(a.threads)
    scheme, group, cached = ROWS[row]
    model, tokenizer, _ = api.load_model("smollm2")
    kernels = {}
    if scheme is not None:
        cfg = RunConfig(model="smollm2", method="rtn", scheme=scheme, group_size=group,
                        error_windows=1,
                        calibration=CalibrationConfig(data=DataSpec(source="pydoc"),
                                                      samples=1, seq_len=64))
        model = api.quantize(cfg, model=model, tokenizer=tokenizer, progress=False).model
        kernels = api.build_backend("cpu").install_kernels(model)
    weight_mb = sum(m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * 4
                    for m in model.modules() if isinstance(m, QuantLinear)) / 2**20
    cache_mb = sum(m.in_features * m.out_features * 4 for m in model.modules()
                   if isinstance(m, QuantLinear) and m.kernel is None) / 2**20 if cached else 0
    prompts = [" ".join(topics[k].split()[:12]) for k in sorted(topics)[:batch]]
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    times = []
    # one cache for all repeats, as in a generation run: the first repeat also pays the
    # one-time dequantization, the best one is the steady state
    with torch.no_grad(), (cached_dequantization() if cached else contextlib.nullcontext()):
        for _ in range(repeats):
            t0 = time.perf_counter()
            seqs = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                  do_sample=False, pad_token_id=tokenizer.pad_token_id)
            times.append(time.perf_counter() - t0)
    best = min(times)
    generated = (seqs.shape[1] - enc.input_ids.shape[1]) * batch
    return {"tokens_per_s": generated / best, "seconds": best, "first_seconds": times[0],
            "kernels": kernels, "quantized_weights_mb": weight_mb, "dequant_cache_mb": cache_mb}


def print_results(args: argparse.Namespace, results: list[dict]) -> None:
    """The rows as a rich table, tokens/s over fp32's at the same batch size."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M greedy generation, {args.new_tokens} new tokens, "
                        f"{args.threads} threads")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col in ("model", "kernels") else "right")
    fp = {r["batch"]: r.get("tokens_per_s") for r in results if r["row"] == "fp32"}
    for r in results:
        if "error" in r:
            table.add_row(r["row"], str(r["batch"]), r["error"], *[""] * 7)
            continue
        ratio = f"{r['tokens_per_s'] / fp[r['batch']]:.2f}x" if fp.get(r["batch"]) else "-"
        table.add_row(r["row"], str(r["batch"]), f"{r['tokens_per_s']:.1f}", ratio,
                      f"{r['first_seconds']:.2f}", f"{r['seconds']:.2f}", f"{r['rss_mb']:.0f}",
                      f"{r['quantized_weights_mb']:.1f}",
                      f"{r['dequant_cache_mb']:.0f}",
                      ", ".join(f"{k}: {v}" for k, v in r["kernels"].items()) or "-")
    Console(width=160).print(table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    p.add_argument("--repeats", type=int, default=3)
    common.add_threads_flag(p)
    p.add_argument("--rows", default=",".join(ROWS))
    common.add_worker_flags(p, ["qcore"], "--one", "--batch", wiki_inputs=False)
    args = common.parse_args_or_run_worker(p, {"qcore": one})
    results = []
    for batch in args.batches:
        for row in args.rows.split(","):
            res = common.run_cell(HERE, "qcore", {"one": row, "batch": batch,
                                                  "new_tokens": args.new_tokens,
                                                  "repeats": args.repeats, "threads": args.threads})
            results.append({"row": row, "batch": batch, **res})
    print_results(args, results)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
