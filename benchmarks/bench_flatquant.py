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
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    load_fp32,
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

    from qcore.schemes import get_scheme

    eval_ids = torch.load(a.eval)
    if a.method == "fp32":
        torch.set_num_threads(a.threads)
        return {"seconds": 0.0, "ppl": window_perplexity(load_fp32(a.model), eval_ids)}
    model, report, seconds = quantize_with_qcore(
        a.model, a.calib, a.method, get_scheme(a.scheme), json.loads(a.options), a.threads)
    layers = [{"index": r.index, "relative_mse": r.relative_mse, "seconds": r.seconds,
               **{k: r.stats[k] for k in ("loss_start", "loss_end", "train_seconds",
                                          "steps", "step_seconds", "reloaded")
                  if k in r.stats}} for r in report.layers]
    return {"seconds": seconds, "ppl": window_perplexity(model, eval_ids), "layers": layers}


def worker_llmc(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from transformers import AutoTokenizer

    eval_ids = torch.load(a.eval)
    model = load_fp32(a.model)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    scheme = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="channel"),
        input_activations=QuantizationArgs(num_bits=4, type="int", symmetric=False,
                                           strategy="token", dynamic=True))
    recipe = QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
    t0 = time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, recipe=recipe)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "ppl": window_perplexity(model, eval_ids)}


# ----------------------------------------------------------------------------- parent
def run_child(python: str, worker: str, a: argparse.Namespace, calib: Path, eval_ids: Path,
              model: Path, method: str = "", scheme: str = "", options: dict | None = None
              ) -> dict:
    out = Path(tempfile.mkstemp(prefix="bench_flatquant_", suffix=".json")[1])
    cmd = [python, str(HERE), "--worker", worker, "--calib", str(calib), "--eval",
           str(eval_ids), "--model", str(model), "--result", str(out), "--threads",
           str(a.threads), "--method", method, "--scheme", scheme,
           "--options", json.dumps(options or {})]
    return run_measured(cmd, out, peer=worker == "llmc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--samples", type=int, default=128, help="calibration windows")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--epochs", type=int, default=15, help="flatquant epochs per layer")
    p.add_argument("--fq-batch-size", type=int, default=4, help="flatquant windows per step")
    p.add_argument("--w8a8-epochs", type=int, default=None, help="epochs for the W8A8 run "
                   "(default: --epochs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="fp32,rtn:W4A4,smoothquant:W4A4,flatquant:W4A4,"
                   "rtn:W8A8,flatquant:W8A8",
                   help="comma-separated method:scheme[:key=value...] rows (method options, "
                        "values as JSON where they parse)")
    p.add_argument("--skip-peer", action="store_true", help="qcore rows only")
    p.add_argument("--json", help="also write all results here")
    p.add_argument("--worker", choices=["qcore", "llmc"], help=argparse.SUPPRESS)
    for hidden in ("--calib", "--eval", "--model", "--result", "--method", "--scheme",
                   "--options"):
        p.add_argument(hidden, help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        result = (worker_qcore if a.worker == "qcore" else worker_llmc)(a)
        Path(a.result).write_text(json.dumps(result))
        return

    from qcore.models.loading import smollm2_folder
    from qcore.plugins import PluginManager

    available = set(PluginManager().registry("quantizer"))
    folder = smollm2_folder()
    files, eval_ids = write_wiki_windows(folder, a.seq_len, a.eval_windows, [a.samples],
                                         tempfile.mkdtemp(prefix="bench_flatquant_"))
    calib = files[a.samples]
    rows: list[tuple[str, dict]] = []
    for row in a.rows.split(","):
        method, _, rest = row.partition(":")
        scheme, *sets = rest.split(":") if rest else [""]
        label = " ".join(["qcore", method, scheme, *sets]).strip()
        if method != "fp32" and method not in available:
            rows.append((label, {"error": f"plugin {method!r} not installed"}))
            continue
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
        rows.append((label, run_child(sys.executable, "qcore", a, calib, eval_ids, folder,
                                      method, scheme, options)))
        print(label, {k: v for k, v in rows[-1][1].items() if k != "layers"}, flush=True)
    if not a.skip_peer:
        label = "llm-compressor RTN W4A4 int"
        if not PEER_PYTHON.exists():
            rows.append((label, {"error": f"{PEER_PYTHON} missing"}))
        else:
            rows.append((label, run_child(str(PEER_PYTHON), "llmc", a, calib, eval_ids,
                                          folder)))

    print(f"\nSmolLM2-135M, calibration {a.samples} x {a.seq_len} (wiki head), perplexity on "
          f"{a.eval_windows} x {a.seq_len} (wiki tail), flatquant epochs {a.epochs} "
          f"(W8A8 {a.w8a8_epochs if a.w8a8_epochs is not None else a.epochs}), "
          f"batch {a.fq_batch_size}, "
          f"{a.threads} threads")
    fp = next((r["ppl"] for n, r in rows if n == "qcore fp32" and "ppl" in r), None)
    print(f"{'method':<30} {'ppl':>9} {'vs fp':>7} {'quant s':>9} {'process s':>10} "
          f"{'peak RSS MB':>12} {'s/step':>7}")
    for name, r in rows:
        if "error" in r:
            print(f"{name:<30} failed: {r['error']}")
            continue
        rel = f"{r['ppl'] / fp:>6.3f}x" if fp else ""
        steps = sum(layer.get("steps", 0) for layer in r.get("layers", []))
        step = sum(layer["step_seconds"] * layer["steps"] for layer in r["layers"]
                   if layer.get("steps")) / steps if steps else None
        print(f"{name:<30} {r['ppl']:>9.2f} {rel:>7} {r['seconds']:>9.1f} {r['wall']:>10.1f} "
              f"{r.get('rss_mb', 0):>12.0f} {f'{step:.3f}' if step else '-':>7}")
    for name, r in rows:
        if name.startswith("qcore flatquant") and "layers" in r:
            print(f"\n{name}: per-layer training loss (MSE of the fake-quantized layer)")
            print(f"{'layer':>5} {'start':>10} {'end':>10} {'end/start':>9} {'rel-mse':>9} "
                  f"{'train s':>8}")
            for layer in r["layers"]:
                print(f"{layer['index']:>5} {layer['loss_start']:>10.3e} "
                      f"{layer['loss_end']:>10.3e} "
                      f"{layer['loss_end'] / max(layer['loss_start'], 1e-30):>9.3f} "
                      f"{layer['relative_mse']:>9.2e} {layer['train_seconds']:>8.1f}"
                      f"{'  (loaded from matrices)' if layer.get('reloaded') else ''}")
            loaded = [layer for layer in r["layers"] if layer.get("reloaded")]
            if loaded:
                total = sum(layer["train_seconds"] for layer in r["layers"])
                print(f"{len(loaded)} of {len(r['layers'])} layers were trained by an earlier "
                      f"run and loaded from its matrices (their train s are that run's); "
                      f"training summed over all layers: {total:.1f} s")
    if a.json:
        Path(a.json).write_text(json.dumps(dict(rows), indent=1))


if __name__ == "__main__":
    main()
