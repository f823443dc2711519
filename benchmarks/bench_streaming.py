"""Memory of quantizing models of real size on this machine: synthetic checkpoints with the
shapes of DeepSeek-R1-Distill-Qwen-1.5B and -7B (random bf16 weights of realistic scale),
quantized by `qcore quantize` in a child process each; peak RSS is the child's whole
process (its VmHWM as it exits: loading, calibration, quantization and saving).

    python benchmarks/bench_streaming.py                  # the issue's two rows
    python benchmarks/bench_streaming.py --quick          # 2-layer checkpoints, small calib
    python benchmarks/bench_streaming.py --rows rtn-7b --layers 4
    python benchmarks/bench_streaming.py --rows gptq-1.5b --layers 2 --activation-budget 64MB
    python benchmarks/bench_streaming.py --rows rtn-7b --evaluate   # + evaluation memory

The checkpoints are built once under ``--work`` (default ~/.cache/qcore/synthetic; 3.5 GB
for 1.5B, 15 GB for 7B at 28 layers) in ~2 GB bf16 shards with transformers' index. The
tokenizer is SmolLM2's (the Qwen tokenizer is not available offline): calibration token
ids then cover the first 49152 rows of the 151936-row embedding.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _common as common
import torch

from qcore.hookspecs import hookimpl

#: Qwen2 shapes of the study's distilled models (config.json of DeepSeek-R1-Distill-Qwen)
SHAPES = {
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=False),
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=151936, tie_word_embeddings=False),
}
#: name -> (shape, method, quantize arguments)
ROWS = {
    "rtn-7b": ("7b", "rtn", ["--scheme", "W4A16", "--group-size", "128",
                             "--error-windows", "0"]),
    "gptq-1.5b": ("1.5b", "gptq", ["--scheme", "W4A16", "--group-size", "128"]),
}
SHARD_BYTES = 2 * 10**9


def build_checkpoint(folder: Path, shape: str, layers: int, seed: int = 0) -> Path:
    """A Qwen2 folder of ``shape`` with ``layers`` decoder layers of random bf16 weights:
    linears N(0, 0.02) (the initializer range of the real configs), norms near 1, biases
    of q/k/v N(0, 0.1); written shard by shard (~2 GB each) so building needs no more
    memory than one layer. Built once: an existing complete folder is reused."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen2Config

    if (folder / "model.safetensors.index.json").is_file():
        return folder
    config = Qwen2Config(num_hidden_layers=layers, max_position_embeddings=32768,
                         rope_theta=10000.0, rms_norm_eps=1e-6, dtype="bfloat16",
                         **SHAPES[shape])
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    gen = torch.Generator().manual_seed(seed)

    def normal(*size: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*size, generator=gen) * std).to(torch.bfloat16)

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=gen)).to(torch.bfloat16)

    def layer(n: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{n}."
        return {p + "input_layernorm.weight": norm(h),
                p + "post_attention_layernorm.weight": norm(h),
                p + "self_attn.q_proj.weight": normal(h, h),
                p + "self_attn.q_proj.bias": normal(h, std=0.1),
                p + "self_attn.k_proj.weight": normal(kv, h),
                p + "self_attn.k_proj.bias": normal(kv, std=0.1),
                p + "self_attn.v_proj.weight": normal(kv, h),
                p + "self_attn.v_proj.bias": normal(kv, std=0.1),
                p + "self_attn.o_proj.weight": normal(h, h),
                p + "mlp.gate_proj.weight": normal(i, h),
                p + "mlp.up_proj.weight": normal(i, h),
                p + "mlp.down_proj.weight": normal(h, i)}

    units = [lambda: {"model.embed_tokens.weight": normal(config.vocab_size, h)},
             *[(lambda n=n: layer(n)) for n in range(layers)],
             lambda: {"model.norm.weight": norm(h),
                      "lm_head.weight": normal(config.vocab_size, h)}]
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    files: list[str] = []

    def flush() -> None:
        name = f"part-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(tmp / name), metadata={"format": "pt"})
        files.append(name)
        shards.append({})

    weight_map: dict[str, str] = {}
    total = 0
    for make in units:
        tensors = make()
        size = sum(t.numel() * 2 for t in tensors.values())
        if shards[-1] and sum(t.numel() * 2 for t in shards[-1].values()) + size > SHARD_BYTES:
            flush()
        shards[-1].update(tensors)
        for name in tensors:
            weight_map[name] = str(len(files))
        total += size
    flush()
    final = {str(k): f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
             for k in range(len(files))}
    for k, name in enumerate(files):
        (tmp / name).rename(tmp / final[str(k)])
    index = {"metadata": {"total_size": total},
             "weight_map": {n: final[k] for n, k in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(tmp)
    from qcore.engine.loading import smollm2_folder

    AutoTokenizer.from_pretrained(str(smollm2_folder())).save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def run_child(args: list[str]) -> tuple[float, float, int, str, list[int]]:
    """(seconds, peak RSS MB, exit code, output tail, each layer's peak RSS MB) of
    ``qcore`` run with ``args`` in a child process. The peak is the child's own VmHWM read
    as it exits: the rusage of a child also counts its parent's resident set at the fork."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        peak_file = Path(tmp) / "peak"
        cmd = [sys.executable, __file__, "--child", str(peak_file), "--", *args]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        peak = float(peak_file.read_text()) if peak_file.is_file() else float("nan")
        layers_file = peak_file.with_name("peak.layers")
        layers = json.loads(layers_file.read_text()) if layers_file.is_file() else []
    return seconds, peak, proc.returncode, proc.stdout if proc.returncode == 0 else (
        proc.stderr + proc.stdout)[-2000:], layers


class LayerMemory:
    """Per decoder layer, the largest resident set sampled (every 0.2 s) during its turn,
    through the ``qcore_layer_quantized`` hook: whether memory follows one layer or grows
    with the layers done. Written to ``<peak file>.layers`` as JSON."""

    def __init__(self, file: Path) -> None:
        import threading

        self.file, self.layers, self.current = file, [], 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.current = max(self.current, common.current_rss_mb())
            time.sleep(0.2)

    @hookimpl
    def qcore_layer_quantized(self, report) -> None:
        self.layers.append(round(max(self.current, common.current_rss_mb())))
        self.current = 0.0
        self.file.write_text(json.dumps(self.layers))


def child(peak_file: str, args: list[str]) -> int:
    """Run the qcore CLI in this process and write its peak RSS (MB) when it ends, and each
    layer's (:class:`LayerMemory`)."""
    import atexit

    from qcore import hostmemory
    from qcore.cli import main as qcore_main
    from qcore.plugins import get_plugin_manager

    hostmemory.reset_peak_rss = lambda: False  # the peak of the whole run, loading included
    atexit.register(lambda: Path(peak_file).write_text(f"{hostmemory.peak_rss_mb():.1f}"))
    get_plugin_manager().pm.register(LayerMemory(Path(peak_file + ".layers")),
                                  name="bench-layer-memory")
    return qcore_main(args)


def evaluate_output(out: Path) -> list[dict]:
    """``qcore evaluate`` of a quantized output (one 32-token window of the wiki tail:
    the memory, not the score, is measured), loaded whole and with ``--stream``."""
    results = []
    for flags in ([], ["--stream"]):
        cmd = ["evaluate", "--model", str(out), "--data", str(common.WIKI), "--data-part", "tail",
               "--seq-len", "32", "--windows", "1", "--batch-size", "1", "--json", *flags]
        seconds, peak, code, output, _ = run_child(cmd)
        if code != 0:
            sys.exit(f"evaluating {out} failed (exit {code}):\n{output}")
        ppl = json.loads(output[output.index("{"):])["perplexity"]
        results.append({"mode": "--stream" if flags else "whole", "peak_rss_mb": round(peak),
                        "seconds": round(seconds, 1), "perplexity": ppl})
    return results


def matmul_gflops() -> None:
    """The matmul behind ``Backend.compute_dtype``: a 7B MLP projection (2048 tokens x
    3584 -> 18944) in each dtype, best of 3."""
    x, w = torch.randn(2048, 3584), torch.randn(18944, 3584)
    print("| dtype | seconds | GFLOPS |\n|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        a, b = x.to(dtype), w.to(dtype)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            torch.nn.functional.linear(a, b)
            best = min(best, time.perf_counter() - t0)
        print(f"| {str(dtype).removeprefix('torch.')} | {best:.2f} | "
              f"{2 * 2048 * 3584 * 18944 / best / 1e9:.0f} |")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"of {', '.join(ROWS)}")
    parser.add_argument("--layers", type=int, default=28,
                        help="decoder layers (real: 28; peak memory follows one layer, the "
                             "time grows with the count)")
    parser.add_argument("--samples", type=int, default=128, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=512, dest="seq_len")
    parser.add_argument("--work", type=Path,
                        default=Path.home() / ".cache" / "qcore" / "synthetic")
    parser.add_argument("--quick", action="store_true",
                        help="2-layer checkpoints, 8 x 128 calibration (a smoke run)")
    parser.add_argument("--activation-budget", dest="activation_budget", metavar="SIZE",
                        help="passed to qcore quantize: offload calibration activations "
                             "beyond SIZE to disk (default: qcore's, half the free memory)")
    parser.add_argument("--max-shard-size", dest="max_shard_size", metavar="SIZE",
                        help="passed to qcore quantize: the output's largest shard")
    parser.add_argument("--evaluate", action="store_true",
                        help="also evaluate each output (one 32-token window), loaded whole "
                             "and with --stream, and print the peak RSS of each")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--matmul", action="store_true",
                        help="only time a 7B-shape matmul in float32, bf16 and fp16")
    return parser


def output_folder(args: argparse.Namespace, row: str) -> Path:
    """Where ``qcore quantize`` saves the row's quantized checkpoint."""
    return args.work / f"out-{row}-{args.layers}l"


def quantize_row(args: argparse.Namespace, row: str) -> dict:
    """Build the row's checkpoint (once), quantize it with ``qcore quantize`` in a child
    process and return the row's measurements."""
    shape, method, extra = ROWS[row]
    folder = build_checkpoint(args.work / f"qwen2-{shape}-{args.layers}l", shape, args.layers)
    out = output_folder(args, row)
    cmd = ["quantize", "--model", str(folder),
           "--method", method, *extra, "--calib", str(common.WIKI), "--calib-part", "head",
           "--samples", str(args.samples), "--seq-len", str(args.seq_len),
           "--save", str(out), "--overwrite", "--json"]
    if args.activation_budget:
        cmd += ["--activation-budget", args.activation_budget]
    if args.max_shard_size:
        cmd += ["--max-shard-size", args.max_shard_size]
    seconds, peak, code, output, layer_peaks = run_child(cmd)
    if code != 0:
        sys.exit(f"{row} failed (exit {code}):\n{output}")
    report = json.loads(output[output.index("{"):])
    per_layer = [x["seconds"] for x in report["layers"]]
    return {"row": row, "shape": f"Qwen2-{shape} ({args.layers} layers)",
            "method": method, "scheme": " ".join(extra[1::2]),
            "calibration": f"{args.samples} x {args.seq_len}"
            if method != "rtn" else "none (no forward)",
            "activations": "offloaded past " + args.activation_budget
            if args.activation_budget else "in memory",
            "checkpoint_gb": round(folder_bytes(folder) / 1e9, 2),
            "peak_rss_mb": round(peak), "seconds": round(seconds, 1),
            "s_per_layer": round(sum(per_layer) / len(per_layer), 1),
            "output_gb": round(folder_bytes(out) / 1e9, 2),
            "layer_peak_rss_mb": layer_peaks}


def print_report(rows: list[dict]) -> None:
    """The rows' table, each row's per-layer peaks, and the evaluations' table."""
    cols = ["shape", "method", "scheme", "calibration", "activations", "checkpoint_gb",
            "peak_rss_mb", "seconds", "s_per_layer", "output_gb"]
    common.print_table(cols, [[str(r[c]) for c in cols] for r in rows])
    for r in rows:
        peaks = r["layer_peak_rss_mb"]
        if peaks:
            print(f"\n{r['row']}: peak RSS MB during each layer's turn: "
                  f"{', '.join(map(str, peaks))}")
    evaluated = [(r, e) for r in rows for e in r.get("evaluation", [])]
    if evaluated:
        print()
        common.print_table(["output of", "evaluate", "peak RSS MB", "seconds", "perplexity"],
                           [[f"{r['row']} ({r['output_gb']} GB)", e["mode"], str(e["peak_rss_mb"]),
                             str(e["seconds"]), f"{e['perplexity']:.6g}"] for r, e in evaluated])
    print(f"\ntorch threads {torch.get_num_threads()}, cpus {os.cpu_count()}")


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.matmul:
        matmul_gflops()
        return
    if args.quick:
        args.layers, args.samples, args.seq_len = 2, 8, 128
    rows = []
    for row in args.rows.split(","):
        if row not in ROWS:
            parser.error(f"--rows: unknown row {row!r} (known: {', '.join(ROWS)})")
        rows.append(quantize_row(args, row))
        print(f"{row}: {rows[-1]}", file=sys.stderr, flush=True)
        if args.evaluate:
            rows[-1]["evaluation"] = evaluate_output(output_folder(args, row))
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print_report(rows)


if __name__ == "__main__":
    if len(sys.argv) > 3 and sys.argv[1] == "--child" and sys.argv[3] == "--":
        sys.exit(child(sys.argv[2], sys.argv[4:]))
    main()
