"""qcore AWQ vs llm-compressor's AWQModifier (and RTN) on SmolLM2-135M, same data and scheme.

Every run is its own subprocess; llm-compressor runs with /work/llmc-venv's Python and
never imports qcore (the parent hands it token-id tensors). The parent reads each child's
peak RSS from os.wait4 and prints one table.

    python benchmarks/bench_awq.py                          # 128 x 512, W4 and W3
    python benchmarks/bench_awq.py --samples 16 --bits 4 --peer-samples 8
    python benchmarks/bench_awq.py --samples 16 --skip-peer --search-samples 4

Data: /work/shared/data/wiki_en.txt cut in two by qcore.data.select_part; N consecutive
512-token windows from the start of the head calibrate, the first 16 windows of the tail
(tokenized at once) evaluate. Scheme: weights asymmetric, group 64, 4 and/or 3 bits, lm_head
in float. Perplexity: the same function on both sides.

llm-compressor: [AWQModifier (its defaults: n_grid 20, duo_scaling True, mappings inferred
for Llama), QuantizationModifier(config_groups with the same QuantizationArgs)]. Its AWQ
activation cache pins memory, which fails without an accelerator, so its worker replaces
torch.Tensor.pin_memory by the identity. Its grid search is slow on CPU: --peer-samples
runs it on fewer calibration windows than qcore (the table says so).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
COLUMNS = [common.Column("method", "<26", "name"), common.Column("N", ">4", "samples"),
           common.Column("ppl", ">8", "ppl", ".2f"),
           common.Column("quant s", ">9", "seconds", ".1f"),
           common.Column("process s", ">10", "wall", ".1f"),
           common.Column("peak RSS MB", ">12", "rss_mb", ".0f")]


# ----------------------------------------------------------------------------- workers
def worker_qcore(a: argparse.Namespace) -> dict:
    import torch

    from qcore.schemes import QuantArgs, QuantScheme

    bits = int(a.bits)
    scheme = QuantScheme(name=f"W{bits}A16", weights=QuantArgs(
        bits=bits, symmetric=False, granularity="group", group_size=a.group_size))
    model, report, seconds = common.quantize_with_qcore(
        a.model, a.calib, a.method, scheme, json.loads(a.options), a.threads, a.batch_size)
    ratios = [v for layer in report.layers for k, v in layer.stats.items()
              if k.endswith(".ratio")]
    detail = f"mean ratio {sum(ratios) / len(ratios):.2f}" if ratios else ""
    return {"seconds": seconds, "ppl": common.window_perplexity(model, torch.load(a.eval)),
            "detail": detail}


def worker_llmc(a: argparse.Namespace) -> dict:
    common.allow_pinning_without_accelerator()
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    model, tokenizer, calib, eval_ids = common.peer_inputs(a)
    scheme = common.llmc_group_scheme(int(a.bits), a.group_size)
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme},
                                                  ignore=["lm_head"])]
    seconds = common.llmc_oneshot(model, tokenizer, calib, recipe)
    return {"seconds": seconds, "ppl": common.window_perplexity(model, eval_ids), "detail": ""}


# ----------------------------------------------------------------------------- parent
def planned_runs(a: argparse.Namespace, bits: int) -> list[tuple[str, str, str, dict, int]]:
    """(row name, side, method, qcore options, calibration windows) of each run at ``bits``."""
    options = {} if a.search_samples is None else {"search_samples": a.search_samples}
    runs = []
    if not a.skip_rtn and not a.skip_qcore:
        runs.append((f"qcore rtn W{bits}", "qcore", "rtn", {}, a.samples))
    if not a.skip_qcore:
        runs.append((f"qcore awq W{bits}", "qcore", "awq", options, a.samples))
    if not a.skip_peer:
        runs.append((f"llm-compressor AWQ W{bits}", "llmc", "awq", {}, a.peer_samples))
    return runs


def run_all(a: argparse.Namespace, wiki: common.WikiFiles) -> list[dict]:
    """Every planned run of every --bits width, one process each, in order."""
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        for name, side, method, options, n in planned_runs(a, bits):
            print(f"--- {name} ({n} calibration windows)", flush=True)
            r = common.run_cell(HERE, side, {**wiki.worker_flags(n), "bits": bits,
                                             "group_size": a.group_size, "threads": a.threads,
                                             "batch_size": a.batch_size, "method": method,
                                             "options": options})
            r.update(name=name, samples=n, bits=bits)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def parse_args() -> argparse.Namespace:
    """The parent's flags; a worker process (hidden --worker) runs its cell and exits."""
    p = common.benchmark_parser(__doc__, wrap_flag_help=True)
    common.add_wiki_flags(p, samples=128, samples_help="qcore calibration windows")
    p.add_argument("--peer-samples", type=int, default=None,
                   help="llm-compressor calibration windows (default: --samples)")
    p.add_argument("--search-samples", type=int, default=None,
                   help="qcore awq search_samples option (default: all windows)")
    p.add_argument("--bits", default="4,3", help="weight bit widths, comma separated")
    common.add_group_batch_flags(p)
    common.add_threads_flag(p)
    common.add_skip_side_flags(p, skip_peer_help="no llm-compressor run")
    p.add_argument("--skip-rtn", action="store_true", help="no qcore RTN baseline")
    p.add_argument("--json", help="also write the rows to this file")
    common.add_worker_flags(p, ["qcore", "llmc"], "--method", "--options")
    return common.parse_args_or_run_worker(p, {"qcore": worker_qcore, "llmc": worker_llmc})


def main() -> None:
    a = parse_args()
    a.peer_samples = a.peer_samples or a.samples
    wiki = common.smollm2_wiki_files(a, [a.samples, a.peer_samples], "bench_awq_")
    rows = run_all(a, wiki)
    search = "all" if a.search_samples is None else str(a.search_samples)
    print(f"\nSmolLM2-135M, weights asym g{a.group_size}, calibration N x {a.seq_len} (wiki "
          f"head), perplexity on {a.eval_windows} x {a.seq_len} (wiki tail), {a.threads} "
          f"threads; qcore awq scores its grid search on {search} windows")
    common.print_results(COLUMNS, rows, notes="detail", labels=2)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
