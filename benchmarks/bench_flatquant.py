"""FlatQuant vs RTN (and SmoothQuant, when its plugin is installed) on SmolLM2-135M, W4A4 and
W8A8, plus a peer row from llm-compressor (RTN W4A4 int, per-token dynamic activations;
llm-compressor has no FlatQuant).

Every row runs in its own subprocess; the parent measures wall time and peak RSS with
os.wait4 and prints one table and FlatQuant's per-layer training losses:

    python benchmarks/bench_flatquant.py                        # 128 x 512, 15 epochs
    python benchmarks/bench_flatquant.py --samples 8 --epochs 2 --skip-peer
    python benchmarks/bench_flatquant.py --samples 32 --epochs 2 --skip-peer \
        --rows fp32,flatquant:W4A4,flatquant:W4A4:ascend=true   # + method options
    python benchmarks/bench_flatquant.py --skip-peer \
        --rows fp32,flatquant:W4A4:matrices=DIR    # keep each layer's training; rerun resumes

Data: /work/shared/data/wiki_en.txt split at the first article title past the middle
(qcore.data.select_part); the head gives N consecutive 512-token calibration windows, the
tail (tokenized at once) the first 16 evaluation windows. The parent writes both as token-id
tensors, so the peer never imports qcore. Perplexity is computed by the same function for
every row. ``s/step`` is FlatQuant's mean training step (forward, backward, AdamW; the
loss evaluations before and after training excluded).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
DEFAULT_ROWS = "fp32,rtn:W4A4,smoothquant:W4A4,flatquant:W4A4,rtn:W8A8,flatquant:W8A8"
PEER_LABEL = "llm-compressor RTN W4A4 int"
COLUMNS = [common.Column("method", "<30", "name"), common.Column("ppl", ">9", "ppl", ".2f"),
           common.Column("vs fp", ">7", "vs_fp"),
           common.Column("quant s", ">9", "seconds", ".1f"),
           common.Column("process s", ">10", "wall", ".1f"),
           common.Column("peak RSS MB", ">12", "rss_mb", ".0f"),
           common.Column("s/step", ">7", "s_step")]
#: the training statistics a worker reports per layer, where the method has them
LAYER_STATS = ("loss_start", "loss_end", "train_seconds", "steps", "step_seconds", "reloaded")


# ----------------------------------------------------------------------------- workers
def worker_qcore(a: argparse.Namespace) -> dict:
    import torch

    from qcore.schemes import get_scheme

    if a.method == "fp32":
        return common.fp32_result(a)
    eval_ids = torch.load(a.eval)
    model, report, seconds = common.quantize_with_qcore(
        a.model, a.calib, a.method, get_scheme(a.scheme), json.loads(a.options), a.threads)
    layers = [{"index": r.index, "relative_mse": r.relative_mse, "seconds": r.seconds,
               **{k: r.stats[k] for k in LAYER_STATS if k in r.stats}}
              for r in report.layers]
    return {"seconds": seconds, "ppl": common.window_perplexity(model, eval_ids), "layers": layers}


def worker_llmc(a: argparse.Namespace) -> dict:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    model, tokenizer, _, eval_ids = common.peer_inputs(a)
    scheme = common.llmc_channel_token_scheme(4, symmetric_activations=False)
    recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ppl": common.window_perplexity(model, eval_ids)}


# ----------------------------------------------------------------------------- parent
def row_options(a: argparse.Namespace, method: str, scheme: str, sets: list[str]) -> dict:
    """A row's qcore options: the epochs and batch flags for flatquant, then its
    ``key=value`` items (values as JSON where they parse)."""
    options = {}
    if method == "flatquant":
        epochs = a.w8a8_epochs if scheme == "W8A8" and a.w8a8_epochs is not None \
            else a.epochs
        options = {"epochs": epochs, "batch_size": a.fq_batch_size}
    for item in sets:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def qcore_rows(a: argparse.Namespace, wiki: common.WikiFiles) -> list[tuple[str, dict]]:
    """(label, result) of each --rows cell, one process each; a method whose plugin is
    not installed gets an error row."""
    from qcore.plugins import PluginManager

    available = set(PluginManager().registry("quantizer"))
    rows: list[tuple[str, dict]] = []
    for row in a.rows.split(","):
        method, _, rest = row.partition(":")
        scheme, *sets = rest.split(":") if rest else [""]
        label = " ".join(["qcore", method, scheme, *sets]).strip()
        if method != "fp32" and method not in available:
            rows.append((label, {"error": f"plugin {method!r} not installed"}))
            continue
        flags = {**wiki.worker_flags(a.samples), "threads": a.threads, "method": method,
                 "scheme": scheme, "options": row_options(a, method, scheme, sets)}
        rows.append((label, common.run_cell(HERE, "qcore", flags)))
        print(label, {k: v for k, v in rows[-1][1].items() if k != "layers"}, flush=True)
    return rows


def mean_step(r: dict) -> float | None:
    """FlatQuant's mean training step over all layers, seconds; None without training."""
    steps = sum(layer.get("steps", 0) for layer in r.get("layers", []))
    if not steps:
        return None
    return sum(layer["step_seconds"] * layer["steps"] for layer in r["layers"]
               if layer.get("steps")) / steps


def print_summary(a: argparse.Namespace, rows: list[tuple[str, dict]]) -> None:
    """The setting and one line per row: perplexity (and over fp32's), times, peak RSS."""
    w8a8_epochs = a.w8a8_epochs if a.w8a8_epochs is not None else a.epochs
    print(f"\nSmolLM2-135M, calibration {a.samples} x {a.seq_len} (wiki head), perplexity on "
          f"{a.eval_windows} x {a.seq_len} (wiki tail), flatquant epochs {a.epochs} "
          f"(W8A8 {w8a8_epochs}), batch {a.fq_batch_size}, {a.threads} threads")
    fp = next((r["ppl"] for n, r in rows if n == "qcore fp32" and "ppl" in r), None)
    shown = []
    for name, r in rows:
        step = mean_step(r) if "error" not in r else None
        shown.append({"name": name, "rss_mb": 0, **r,
                      "vs_fp": f"{r['ppl'] / fp:>6.3f}x" if fp and "ppl" in r else "",
                      "s_step": f"{step:.3f}" if step else "-"})
    common.print_results(COLUMNS, shown)


def print_training(name: str, layers: list[dict]) -> None:
    """FlatQuant's per-layer training losses of one row."""
    print(f"\n{name}: per-layer training loss (MSE of the fake-quantized layer)")
    print(f"{'layer':>5} {'start':>10} {'end':>10} {'end/start':>9} {'rel-mse':>9} "
          f"{'train s':>8}")
    for layer in layers:
        print(f"{layer['index']:>5} {layer['loss_start']:>10.3e} "
              f"{layer['loss_end']:>10.3e} "
              f"{layer['loss_end'] / max(layer['loss_start'], 1e-30):>9.3f} "
              f"{layer['relative_mse']:>9.2e} {layer['train_seconds']:>8.1f}"
              f"{'  (loaded from matrices)' if layer.get('reloaded') else ''}")
    loaded = [layer for layer in layers if layer.get("reloaded")]
    if loaded:
        total = sum(layer["train_seconds"] for layer in layers)
        print(f"{len(loaded)} of {len(layers)} layers were trained by an earlier "
              f"run and loaded from its matrices (their train s are that run's); "
              f"training summed over all layers: {total:.1f} s")


def parse_args() -> argparse.Namespace:
    """The parent's flags; a worker process (hidden --worker) runs its cell and exits."""
    p = common.benchmark_parser(__doc__)
    common.add_wiki_flags(p, samples=128)
    p.add_argument("--epochs", type=int, default=15, help="flatquant epochs per layer")
    p.add_argument("--fq-batch-size", type=int, default=4, help="flatquant windows per step")
    p.add_argument("--w8a8-epochs", type=int, default=None, help="epochs for the W8A8 run "
                   "(default: --epochs)")
    common.add_threads_flag(p)
    p.add_argument("--rows", default=DEFAULT_ROWS,
                   help="comma-separated method:scheme[:key=value...] rows (method options, "
                        "values as JSON where they parse)")
    p.add_argument("--skip-peer", action="store_true", help="qcore rows only")
    p.add_argument("--json", help="also write all results here")
    common.add_worker_flags(p, ["qcore", "llmc"], "--method", "--scheme", "--options")
    return common.parse_args_or_run_worker(p, {"qcore": worker_qcore, "llmc": worker_llmc})


def main() -> None:
    a = parse_args()
    wiki = common.smollm2_wiki_files(a, [a.samples], "bench_flatquant_")
    rows = qcore_rows(a, wiki)
    if not a.skip_peer:
        flags = {**wiki.worker_flags(a.samples), "threads": a.threads, "method": "",
                 "scheme": "", "options": {}}
        rows.append((PEER_LABEL, common.run_cell(HERE, "llmc", flags)))
    print_summary(a, rows)
    for name, r in rows:
        if name.startswith("qcore flatquant") and "layers" in r:
            print_training(name, r["layers"])
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
