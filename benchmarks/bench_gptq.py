"""qcore GPTQ vs llm-compressor's GPTQModifier on SmolLM2-135M, same data, same scheme.

Both sides run in their own subprocess (llm-compressor in /work/llmc-venv); the parent
measures each child's peak RSS with os.wait4 and prints one table:

    python benchmarks/bench_gptq.py                 # 128 x 512 calibration tokens
    python benchmarks/bench_gptq.py --samples 16 --skip-peer --rtn

Data: /work/shared/data/wiki_en.txt split in two at the first article title past the
middle (qcore.data.select_part); the head gives N consecutive 512-token calibration
windows, the tail (tokenized at once) the first 16 evaluation windows. The parent writes
both as token-id tensors so the peer never imports qcore. Scheme: W4A16 asymmetric, group
64, damp 0.01, block 128; act-order with static groups on both sides (llm-compressor's
default "static" actorder) unless --no-act-order. Perplexity is computed by the same
function on both sides.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _common import (
    llmc_oneshot,
    load_fp32,
    peak_rss_mb,
    quantize_with_qcore,
    run_measured,
    window_perplexity,
    write_wiki_windows,
)

HERE = Path(__file__).resolve()
PEER_PYTHON = Path("/work/llmc-venv/bin/python")


# ----------------------------------------------------------------------------- workers
def worker_qcore(a: argparse.Namespace) -> dict:
    import torch

    from qcore.config import parse_assignments
    from qcore.schemes import get_scheme

    method = a.worker.removeprefix("qcore-") if a.worker != "qcore" else "gptq"
    options = {"act_order": a.act_order, "static_groups": a.act_order} if method == "gptq" else {}
    if method == "gptq":
        options.update(parse_assignments(a.qcore_set))
    model, report, seconds = quantize_with_qcore(
        a.model, a.calib, method, get_scheme("W4A16", a.group_size), options, a.threads,
        a.batch_size)
    quant_rss = peak_rss_mb()
    hessian_s = sum(layer.stats.get("hessian_seconds", 0.0) for layer in report.layers)
    detail = f"Hessian passes {hessian_s:.0f}s" if method == "gptq" else ""
    ppl = window_perplexity(model, torch.load(a.eval), batch_size=1)
    return {"seconds": seconds, "quant_rss_mb": quant_rss, "ppl": ppl, "detail": detail}


def worker_llmc(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import GPTQModifier

    calib = torch.load(a.calib)
    eval_ids = torch.load(a.eval)
    model = load_fp32(a.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group",
                                 group_size=a.group_size))
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"],
                          block_size=128, dampening_frac=0.01,
                          actorder="static" if a.act_order else None)
    seconds = llmc_oneshot(model, tokenizer, calib, recipe)
    quant_rss = peak_rss_mb()
    ppl = window_perplexity(model, eval_ids, batch_size=1)
    return {"seconds": seconds, "quant_rss_mb": quant_rss, "ppl": ppl, "detail": ""}


# ----------------------------------------------------------------------------- parent
def run_child(python: str, side: str, a: argparse.Namespace, calib: Path, eval_ids: Path,
              model: Path) -> dict:
    out = Path(tempfile.mkstemp(prefix=f"bench_gptq_{side}_", suffix=".json")[1])
    cmd = [python, str(HERE), "--worker", side, "--calib", str(calib), "--eval", str(eval_ids),
           "--model", str(model), "--result", str(out), "--group-size", str(a.group_size),
           "--threads", str(a.threads), "--batch-size", str(a.batch_size)]
    if not a.act_order:
        cmd.append("--no-act-order")
    for item in a.qcore_set:
        cmd += ["--qcore-set", item]
    return run_measured(cmd, out, peer=side == "llmc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="qcore calibration batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    p.add_argument("--skip-peer", action="store_true", help="run qcore only")
    p.add_argument("--skip-qcore", action="store_true", help="run llm-compressor only")
    p.add_argument("--rtn", action="store_true", help="add a qcore RTN row (same scheme)")
    p.add_argument("--qcore-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra qcore gptq option, e.g. true_sequential=false (repeatable)")
    p.add_argument("--worker", choices=["qcore", "qcore-rtn", "llmc"], help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        result = (worker_llmc if a.worker == "llmc" else worker_qcore)(a)
        Path(a.result).write_text(json.dumps(result))
        return

    from qcore.models.loading import smollm2_folder

    folder = smollm2_folder()
    files, eval_ids = write_wiki_windows(folder, a.seq_len, a.eval_windows, [a.samples],
                                         tempfile.mkdtemp(prefix="bench_gptq_"))
    calib = files[a.samples]
    rows = []
    if not a.skip_qcore:
        rows.append(("qcore gptq", run_child(sys.executable, "qcore", a, calib, eval_ids,
                                             folder)))
    if a.rtn:
        rows.append(("qcore rtn", run_child(sys.executable, "qcore-rtn", a, calib, eval_ids,
                                            folder)))
    if not a.skip_peer:
        if not PEER_PYTHON.exists():
            rows.append(("llm-compressor GPTQModifier", {"error": f"{PEER_PYTHON} missing"}))
        else:
            rows.append(("llm-compressor GPTQModifier",
                         run_child(str(PEER_PYTHON), "llmc", a, calib, eval_ids, folder)))
    order = "act-order + static groups" if a.act_order else "natural order"
    if a.qcore_set:
        order += f"; qcore gptq {' '.join(a.qcore_set)}"
    print(f"\nSmolLM2-135M, W4A16 asym g{a.group_size}, {order}, calibration {a.samples} x "
          f"{a.seq_len} (wiki head), perplexity on {a.eval_windows} x {a.seq_len} (wiki tail), "
          f"{a.threads} threads")
    print("quant s / quant RSS: the quantization call and the process's peak RSS up to its end "
          "(model load included); process: the whole child, perplexity included")
    print(f"{'method':<30} {'ppl':>8} {'quant s':>9} {'quant RSS MB':>13} {'process s':>10} "
          f"{'process RSS MB':>15}  notes")
    for name, r in rows:
        if "error" in r:
            print(f"{name:<30} failed: {r['error']}")
            continue
        print(f"{name:<30} {r['ppl']:>8.2f} {r['seconds']:>9.1f} {r['quant_rss_mb']:>13.0f} "
              f"{r['wall']:>10.1f} {r['rss_mb']:>15.0f}  {r.get('detail', '')}")


if __name__ == "__main__":
    main()
