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
import sys
import tempfile
from pathlib import Path

from _common import (
    llmc_oneshot,
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

    from qcore.schemes import QuantArgs, QuantScheme

    scheme = QuantScheme(name=f"W{a.bits}A16", weights=QuantArgs(
        bits=a.bits, symmetric=False, granularity="group", group_size=a.group_size))
    model, report, seconds = quantize_with_qcore(
        a.model, a.calib, a.method, scheme, json.loads(a.options), a.threads, a.batch_size)
    ratios = [v for layer in report.layers for k, v in layer.stats.items()
              if k.endswith(".ratio")]
    detail = f"mean ratio {sum(ratios) / len(ratios):.2f}" if ratios else ""
    return {"seconds": seconds, "ppl": window_perplexity(model, torch.load(a.eval)),
            "detail": detail}


def worker_llmc(a: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    # AWQModifier pins its activation cache; pinning needs an accelerator and only speeds
    # host-to-device copies, so on a CPU-only machine it becomes the identity
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier
    from transformers import AutoTokenizer

    calib, eval_ids = torch.load(a.calib), torch.load(a.eval)
    model = load_fp32(a.model)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=a.bits, type="int", symmetric=False, strategy="group",
        group_size=a.group_size))
    recipe = [AWQModifier(), QuantizationModifier(config_groups={"group_0": scheme},
                                                  ignore=["lm_head"])]
    seconds = llmc_oneshot(model, tokenizer, calib, recipe)
    return {"seconds": seconds, "ppl": window_perplexity(model, eval_ids), "detail": ""}


# ----------------------------------------------------------------------------- parent
def run_child(python: str, side: str, a: argparse.Namespace, calib: Path, eval_ids: Path,
              model: Path, bits: int, method: str = "awq", options: dict | None = None
              ) -> dict:
    out = Path(tempfile.mkstemp(prefix=f"bench_awq_{side}_", suffix=".json")[1])
    cmd = [python, str(HERE), "--worker", side, "--calib", str(calib), "--eval", str(eval_ids),
           "--model", str(model), "--result", str(out), "--bits", str(bits),
           "--group-size", str(a.group_size), "--threads", str(a.threads),
           "--batch-size", str(a.batch_size), "--method", method,
           "--options", json.dumps(options or {})]
    return run_measured(cmd, out, peer=side == "llmc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=128, help="qcore calibration windows")
    p.add_argument("--peer-samples", type=int, default=None,
                   help="llm-compressor calibration windows (default: --samples)")
    p.add_argument("--search-samples", type=int, default=None,
                   help="qcore awq search_samples option (default: all windows)")
    p.add_argument("--bits", default="4,3", help="weight bit widths, comma separated")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4, help="qcore calibration batch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-peer", action="store_true", help="no llm-compressor run")
    p.add_argument("--skip-rtn", action="store_true", help="no qcore RTN baseline")
    p.add_argument("--skip-qcore", action="store_true", help="run llm-compressor only")
    p.add_argument("--json", help="also write the rows to this file")
    p.add_argument("--worker", choices=["qcore", "llmc"], help=argparse.SUPPRESS)
    p.add_argument("--method", default="awq", help=argparse.SUPPRESS)
    p.add_argument("--options", default="{}", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--eval", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()

    if a.worker:
        a.bits = int(a.bits)
        result = (worker_qcore if a.worker == "qcore" else worker_llmc)(a)
        Path(a.result).write_text(json.dumps(result))
        return

    from qcore.models.loading import smollm2_folder

    a.peer_samples = a.peer_samples or a.samples
    folder = smollm2_folder()
    files, eval_file = write_wiki_windows(folder, a.seq_len, a.eval_windows,
                                          [a.samples, a.peer_samples],
                                          tempfile.mkdtemp(prefix="bench_awq_"))
    options = {} if a.search_samples is None else {"search_samples": a.search_samples}
    rows = []
    for bits in [int(b) for b in a.bits.split(",")]:
        runs = []
        if not a.skip_rtn and not a.skip_qcore:
            runs.append((f"qcore rtn W{bits}", sys.executable, "qcore", "rtn", {}, a.samples))
        if not a.skip_qcore:
            runs.append((f"qcore awq W{bits}", sys.executable, "qcore", "awq", options,
                         a.samples))
        if not a.skip_peer:
            runs.append((f"llm-compressor AWQ W{bits}", str(PEER_PYTHON), "llmc", "awq", {},
                         a.peer_samples))
        for name, python, side, method, opts, n in runs:
            print(f"--- {name} ({n} calibration windows)", flush=True)
            if side == "llmc" and not PEER_PYTHON.exists():
                r = {"error": f"{PEER_PYTHON} missing", "wall": 0.0, "rss_mb": 0.0}
            else:
                r = run_child(python, side, a, files[n], eval_file, folder, bits, method, opts)
            r.update(name=name, samples=n, bits=bits)
            rows.append(r)
            print(json.dumps(r), flush=True)
    search = "all" if a.search_samples is None else str(a.search_samples)
    print(f"\nSmolLM2-135M, weights asym g{a.group_size}, calibration N x {a.seq_len} (wiki "
          f"head), perplexity on {a.eval_windows} x {a.seq_len} (wiki tail), {a.threads} "
          f"threads; qcore awq scores its grid search on {search} windows")
    print(f"{'method':<26} {'N':>4} {'ppl':>8} {'quant s':>9} {'process s':>10} "
          f"{'peak RSS MB':>12}  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['name']:<26} {r['samples']:>4} failed: {r['error']}")
            continue
        print(f"{r['name']:<26} {r['samples']:>4} {r['ppl']:>8.2f} {r['seconds']:>9.1f} "
              f"{r['wall']:>10.1f} {r['rss_mb']:>12.0f}  {r.get('detail', '')}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
