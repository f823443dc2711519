"""Every method at its defaults, qcore vs llm-compressor, side by side on SmolLM2-135M.

    python benchmarks/bench_methods.py                    # the whole table (hours: see below)
    python benchmarks/bench_methods.py --quick            # smoke run, a few minutes
    python benchmarks/bench_methods.py --rows gptq:W4A16,gptq:W3A16 --markdown

Each cell (method x scheme x side) runs in its own process, one after the other, so
that the parent reads each one's peak RSS (os.wait4) and nothing runs beside it. qcore
runs ``--method X`` with no options (the product's defaults; ``--qcore-set
method.key=value`` overrides one); llm-compressor 0.14 (its own venv, /work/llmc-venv)
runs its default modifier for the same scheme: QuantizationModifier (RTN), GPTQModifier,
AWQModifier + QuantizationModifier, SmoothQuantModifier + QuantizationModifier. FlatQuant
has no llm-compressor counterpart.

Data (both sides get the same token ids, written once by the parent): SmolLM2-135M-Instruct
in float32; calibration = N consecutive 512-token windows of the head of
../shared/data/wiki_en.txt (N = --samples, 128; AWQ --awq-samples, 32, on both sides,
because the peer's AWQ takes ~18 min at 32); evaluation = perplexity on the first
--eval-windows 512-token windows of the tail, by one function on both sides. Schemes
(qcore presets; the peer's equivalents): W4A16/W3A16 asymmetric weights in groups of 64
(SmolLM2's hidden size 576 is no multiple of 128); W8A8 int8 symmetric per-channel
weights, dynamic symmetric per-token activations; W4A4 int4 symmetric per-channel weights,
dynamic asymmetric per-token activations. 2 threads per side.

"seconds" is the quantization call only (model load and evaluation excluded), "RSS" the
process's peak resident set up to the end of quantization (model load included,
evaluation not; VmHWM read in the worker); the ratios are qcore / peer. The rows go
through the same layer-wise pipeline ``qcore quantize`` runs (``run_layerwise``) on the
float32 model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
GROUP = 64

#: the issue's grid: method -> schemes
DEFAULT_ROWS = ("rtn:W4A16,rtn:W3A16,gptq:W4A16,gptq:W3A16,awq:W4A16,awq:W3A16,"
                "rtn:W8A8,smoothquant:W8A8,rtn:W4A4,smoothquant:W4A4,flatquant:W4A4")
#: llm-compressor has these; the others are qcore only
PEER_METHODS = {"rtn", "gptq", "awq", "smoothquant"}
#: --quick: every cell runs, on a few short windows, FlatQuant trained for one epoch
QUICK = {"samples": 4, "awq_samples": 4, "seq_len": 128, "eval_windows": 4,
         "qcore_set": ["flatquant.epochs=1"]}
COLUMNS = ["method", "scheme", "calibration", "qcore ppl", "peer ppl", "qcore s", "peer s",
           "time ratio", "qcore RSS MB", "peer RSS MB", "RSS ratio"]


# ----------------------------------------------------------------------------- workers
def qcore_scheme(name: str):
    from qcore.schemes import get_scheme

    return get_scheme(name, GROUP if name.endswith("A16") else None)


def worker_qcore(a: argparse.Namespace) -> dict:
    import torch

    if a.method == "fp32":
        return common.fp32_result(a, batch_size=1)
    eval_ids = torch.load(a.eval)
    options = json.loads(a.options)
    propagation = options.pop("propagation", None)
    model, report, seconds = common.quantize_with_qcore(
        a.model, a.calib, a.method, qcore_scheme(a.scheme), options, a.threads,
        propagation=propagation)
    rss = common.peak_rss_mb()
    ppl = common.window_perplexity(model, eval_ids, 1)
    return {"seconds": seconds, "quant_rss_mb": rss, "ppl": ppl}


def peer_recipe(method: str, scheme: str) -> list:
    """llm-compressor's default modifiers for one qcore scheme (peer venv only)."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    bits = int(scheme[1])
    cfg = (common.llmc_group_scheme(bits, GROUP) if scheme.endswith("A16")
           else common.llmc_channel_token_scheme(bits, symmetric_activations=bits == 8))
    groups = {"config_groups": {"group_0": cfg}, "ignore": ["lm_head"]}
    if method == "gptq":
        return [GPTQModifier(**groups)]
    modifiers = []
    if method == "awq":
        from llmcompressor.modifiers.transform.awq import AWQModifier
        modifiers.append(AWQModifier())
    elif method == "smoothquant":
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier
        modifiers.append(SmoothQuantModifier())
    return [*modifiers, QuantizationModifier(**groups)]


def worker_llmc(a: argparse.Namespace) -> dict:
    common.allow_pinning_without_accelerator()
    model, tokenizer, calib, eval_ids = common.peer_inputs(a)
    seconds = common.llmc_oneshot(model, tokenizer, calib, peer_recipe(a.method, a.scheme))
    rss = common.peak_rss_mb()
    ppl = common.window_perplexity(model, eval_ids, 1)
    return {"seconds": seconds, "quant_rss_mb": rss, "ppl": ppl}


# ----------------------------------------------------------------------------- parent
def run_one(a: argparse.Namespace, wiki: common.WikiFiles, side: str, method: str, scheme: str,
            options: dict, samples: int) -> dict:
    """One cell (method x scheme x side) on ``samples`` calibration windows."""
    print(f"[bench_methods] {side} {method} {scheme} {options or ''}", file=sys.stderr,
          flush=True)
    return common.run_cell(HERE, side, {"method": method, "scheme": scheme, "options": options,
                                        **wiki.worker_flags(samples), "threads": a.threads})


def qcore_options(method: str, assignments: list[str]) -> dict:
    """``method.key=value`` items of --qcore-set that belong to ``method``."""
    from qcore.config import parse_assignments

    mine = [item.split(".", 1)[1] for item in assignments if item.split(".", 1)[0] == method]
    return parse_assignments(mine)


def run_rows(a: argparse.Namespace, wiki: common.WikiFiles, cells: list[tuple[str, ...]],
             peer_ok: bool) -> list[dict]:
    """Each method:scheme cell on qcore and, where llm-compressor has the method, the peer."""
    rows = []
    for method, scheme in cells:
        n = a.awq_samples if method == "awq" else a.samples
        options = qcore_options(method, a.qcore_set)
        row = {"method": method, "scheme": scheme, "options": options,
               "calibration": f"{n} x {a.seq_len}",
               "qcore": run_one(a, wiki, "qcore", method, scheme, options, n)}
        if peer_ok and method in PEER_METHODS:
            row["peer"] = run_one(a, wiki, "llmc", method, scheme, {}, n)
        rows.append(row)
    return rows


def ratio(q: dict, p: dict | None, key: str) -> str:
    if not p or "error" in p or "error" in q or not p.get(key):
        return "-"
    return f"{q[key] / p[key]:.2f}"


def cell(r: dict | None, key: str, fmt: str) -> str:
    if r is None:
        return "-"
    if "error" in r:
        return "failed"
    return format(r[key], fmt)


def print_comparison(rows: list[dict], header: str, markdown: bool) -> None:
    """The header, then a line per method:scheme with both sides and qcore/peer ratios."""
    lines = []
    for row in rows:
        q, p = row["qcore"], row.get("peer")
        lines.append([row["method"], row["scheme"], row["calibration"],
                      cell(q, "ppl", ".2f"), cell(p, "ppl", ".2f"),
                      cell(q, "seconds", ".1f"), cell(p, "seconds", ".1f"),
                      ratio(q, p, "seconds"), cell(q, "quant_rss_mb", ".0f"),
                      cell(p, "quant_rss_mb", ".0f"), ratio(q, p, "quant_rss_mb")])
    print("\n" + header)
    common.print_table(COLUMNS, lines, markdown)


def build_parser() -> argparse.ArgumentParser:
    p = common.benchmark_parser(__doc__)
    p.add_argument("--rows", default=DEFAULT_ROWS, help="method:scheme cells, comma separated")
    common.add_wiki_flags(p, samples=128)
    p.add_argument("--awq-samples", type=int, default=32, help="calibration windows for AWQ")
    common.add_threads_flag(p)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 4 x 128 calibration, 4 evaluation windows, FlatQuant 1 epoch")
    p.add_argument("--skip-peer", action="store_true", help="qcore cells only")
    p.add_argument("--qcore-set", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="override one qcore default, e.g. gptq.act_order=false (repeatable); "
                        "METHOD.propagation=full|quantized is the run's --propagation")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", help="also write every cell's result to this file")
    common.add_worker_flags(p, ["qcore", "llmc"], "--method", "--scheme", "--options")
    return p


def main() -> None:
    p = build_parser()
    a = common.parse_args_or_run_worker(p, {"qcore": worker_qcore, "llmc": worker_llmc})
    if a.quick:
        for key, value in QUICK.items():
            setattr(a, key, value if key != "qcore_set" else value + a.qcore_set)
    cells = [tuple(item.split(":")) for item in a.rows.split(",") if item]
    for method_scheme in cells:
        if len(method_scheme) != 2:
            p.error(f"--rows: {':'.join(method_scheme)!r} is not METHOD:SCHEME")
    sizes = {a.samples} | ({a.awq_samples} if any(m == "awq" for m, _ in cells) else set())
    wiki = common.smollm2_wiki_files(a, sorted(sizes), "bench_methods_")
    fp = run_one(a, wiki, "qcore", "fp32", "", {}, a.samples)
    peer_ok = not a.skip_peer and common.PEER_PYTHON.exists()
    rows = run_rows(a, wiki, cells, peer_ok)
    header = (f"SmolLM2-135M-Instruct float32 (fp32 perplexity {cell(fp, 'ppl', '.2f')}); "
              f"wiki_en head calibration, perplexity on {a.eval_windows} x {a.seq_len} windows "
              f"of the tail; W*A16 asymmetric g{GROUP}; {a.threads} threads per side, one cell "
              f"at a time; qcore options: {' '.join(a.qcore_set) or 'defaults'}; peer: "
              f"llm-compressor 0.14 defaults" + ("" if peer_ok else " (not run)"))
    print_comparison(rows, header, a.markdown)
    if a.json:
        Path(a.json).write_text(json.dumps({"fp32": fp, "rows": rows, "args": vars(a)},
                                           indent=1))


if __name__ == "__main__":
    main()
