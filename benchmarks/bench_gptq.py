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
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
COLUMNS = [common.Column("method", "<30", "name"), common.Column("ppl", ">8", "ppl", ".2f"),
           common.Column("quant s", ">9", "seconds", ".1f"),
           common.Column("quant RSS MB", ">13", "quant_rss_mb", ".0f"),
           common.Column("process s", ">10", "wall", ".1f"),
           common.Column("process RSS MB", ">15", "rss_mb", ".0f")]


# ----------------------------------------------------------------------------- workers
def worker_qcore(a: argparse.Namespace) -> dict:
    import torch

    from qcore.config import parse_assignments
    from qcore.schemes import get_scheme

    method = a.worker.removeprefix("qcore-") if a.worker != "qcore" else "gptq"
    options = {"act_order": a.act_order, "static_groups": a.act_order} if method == "gptq" else {}
    if method == "gptq":
        options.update(parse_assignments(a.qcore_set))
    model, report, seconds = common.quantize_with_qcore(
        a.model, a.calib, method, get_scheme("W4A16", a.group_size), options, a.threads,
        a.batch_size)
    quant_rss = common.peak_rss_mb()
    hessian_s = sum(layer.stats.get("hessian_seconds", 0.0) for layer in report.layers)
    detail = f"Hessian passes {hessian_s:.0f}s" if method == "gptq" else ""
    losses = {f"{layer.name.removeprefix('model.')}.{key.removesuffix('.loss')}": value
              for layer in report.layers for key, value in layer.stats.items()
              if key.endswith(".loss") and method == "gptq"}
    ppl = common.window_perplexity(model, torch.load(a.eval), batch_size=1)
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
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, tokenizer, calib, eval_ids = common.peer_inputs(a)
    recipe = GPTQModifier(config_groups={"group_0": common.llmc_group_scheme(4, a.group_size)},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                          actorder="static" if a.act_order else None)
    losses = record_llmc_losses(model, calib.shape[1])
    seconds = common.llmc_oneshot(model, tokenizer, calib, recipe)
    quant_rss = common.peak_rss_mb()
    ppl = common.window_perplexity(model, eval_ids, batch_size=1)
    return {"seconds": seconds, "quant_rss_mb": quant_rss, "ppl": ppl, "detail": "",
            "losses": losses}


def print_losses(rows: list[dict], first: int) -> None:
    """Per-linear GPTQ objective of each side, and qcore's over the peer's per layer."""
    have = [(r["name"], r["losses"]) for r in rows if r.get("losses")]
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
def run_side(name: str, side: str, a: argparse.Namespace, wiki: common.WikiFiles) -> dict:
    """One side's cell (``side``: qcore, qcore-rtn or llmc) as the table row ``name``."""
    flags = {**wiki.worker_flags(a.samples), "group_size": a.group_size,
             "threads": a.threads, "batch_size": a.batch_size,
             "no_act_order": not a.act_order, "qcore_set": a.qcore_set}
    return {"name": name, **common.run_cell(HERE, side, flags)}


def parse_args() -> argparse.Namespace:
    """The parent's flags; a worker process (hidden --worker) runs its cell and exits."""
    p = common.benchmark_parser(__doc__)
    common.add_wiki_flags(p, samples=128)
    common.add_group_batch_flags(p)
    common.add_threads_flag(p)
    p.add_argument("--no-act-order", dest="act_order", action="store_false")
    common.add_skip_side_flags(p, skip_peer_help="run qcore only")
    p.add_argument("--rtn", action="store_true", help="add a qcore RTN row (same scheme)")
    p.add_argument("--qcore-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra qcore gptq option, e.g. true_sequential=false (repeatable)")
    p.add_argument("--loss-layers", type=int, default=30,
                   help="decoder layers whose per-linear objective ratio is printed")
    common.add_worker_flags(p, ["qcore", "qcore-rtn", "llmc"])
    workers = {"qcore": worker_qcore, "qcore-rtn": worker_qcore, "llmc": worker_llmc}
    return common.parse_args_or_run_worker(p, workers)


def main() -> None:
    a = parse_args()
    wiki = common.smollm2_wiki_files(a, [a.samples], "bench_gptq_")
    rows = []
    if not a.skip_qcore:
        rows.append(run_side("qcore gptq", "qcore", a, wiki))
    if a.rtn:
        rows.append(run_side("qcore rtn", "qcore-rtn", a, wiki))
    if not a.skip_peer:
        rows.append(run_side("llm-compressor GPTQModifier", "llmc", a, wiki))
    order = "act-order + static groups" if a.act_order else "natural order"
    if a.qcore_set:
        order += f"; qcore gptq {' '.join(a.qcore_set)}"
    print(f"\nSmolLM2-135M, W4A16 asym g{a.group_size}, {order}, calibration {a.samples} x "
          f"{a.seq_len} (wiki head), perplexity on {a.eval_windows} x {a.seq_len} (wiki tail), "
          f"{a.threads} threads")
    print("quant s / quant RSS: the quantization call and the process's peak RSS up to its end "
          "(model load included); process: the whole child, perplexity included")
    common.print_results(COLUMNS, rows, notes="detail")
    print_losses(rows, a.loss_layers)


if __name__ == "__main__":
    main()
