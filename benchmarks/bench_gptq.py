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
    losses = {f"{layer.name.removeprefix('model.')}.{key.removesuffix('.loss')}": value
              for layer in report.layers for key, value in layer.stats.items()
              if key.endswith(".loss") and method == "gptq"}
    ppl = window_perplexity(model, torch.load(a.eval), batch_size=1)
    return {"seconds": seconds, "quant_rss_mb": quant_rss, "ppl": ppl, "detail": detail,
            "losses": losses}


def record_llmc_losses(model, seq_len: int) -> dict:
    """Patch llm-compressor's GPTQ entry points to record each linear's objective
    tr((W - Q) H (W - Q)^T) with H normalised per token as qcore's is (the peer divides by
    sequences, so its H is seq_len times larger). Returns the dict it fills."""
    from llmcompressor.modifiers.gptq import base

    names = {module: name for name, module in model.named_modules()}
    losses: dict[str, float] = {}
    pending: list[list[str]] = []
    prepare, solve = base.prepare_batch, base.quantize_weight

    def prepare_batch(batch, *args, **kwargs):
        pending.append([names[m] for m in batch])
        return prepare(batch, *args, **kwargs)

    def quantize_weight(*, weights, hessians, **kwargs):
        W, H = weights.clone().double(), hessians.clone().double() / seq_len
        out = solve(weights=weights, hessians=hessians, **kwargs)
        delta = W - out[0].double()
        for name, d, h in zip(pending.pop(0), delta, H, strict=True):
            losses[name.removeprefix("model.")] = float(((d @ h) * d).sum())
        return out

    base.prepare_batch, base.quantize_weight = prepare_batch, quantize_weight
    return losses


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
    losses = record_llmc_losses(model, calib.shape[1])
    seconds = llmc_oneshot(model, tokenizer, calib, recipe)
    quant_rss = peak_rss_mb()
    ppl = window_perplexity(model, eval_ids, batch_size=1)
    return {"seconds": seconds, "quant_rss_mb": quant_rss, "ppl": ppl, "detail": "",
            "losses": losses}


def print_losses(rows: list[tuple[str, dict]], first: int) -> None:
    """Per-linear GPTQ objective of each side, and qcore's over the peer's per layer."""
    have = [(name, r["losses"]) for name, r in rows if r.get("losses")]
    if len(have) < 2:
        return
    (qname, q), (pname, peer) = have[0], have[-1]
    common = [k for k in q if k in peer]
    if not common:
        return
    print(f"\nGPTQ objective tr((W-Q) H (W-Q)^T), H per token; {qname} / {pname}")
    layers: dict[str, list[str]] = {}
    for key in common:
        layers.setdefault(key.rsplit(".", 2)[0], []).append(key)
    for i, (layer, keys) in enumerate(layers.items()):
        ratios = " ".join(f"{k.split('.')[-1]}={q[k] / peer[k]:.3f}" for k in keys
                          if peer[k] > 0)
        qs, ps = sum(q[k] for k in keys), sum(peer[k] for k in keys)
        if i < first or i == len(layers) - 1:
            print(f"{layer:<12} qcore {qs:>11.4g} peer {ps:>11.4g} ratio {qs / ps:6.3f}  "
                  f"{ratios}")
    total_q, total_p = sum(q[k] for k in common), sum(peer[k] for k in common)
    print(f"{'all':<12} qcore {total_q:>11.4g} peer {total_p:>11.4g} ratio "
          f"{total_q / total_p:6.3f}")


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
    p.add_argument("--loss-layers", type=int, default=30,
                   help="decoder layers whose per-linear objective ratio is printed")
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
    print_losses(rows, a.loss_layers)


if __name__ == "__main__":
    main()
