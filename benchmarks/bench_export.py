"""compressed-tensors both ways on SmolLM2-135M, each side measured by its own tools.

    python benchmarks/bench_export.py                # 32 x 512 calibration windows
    python benchmarks/bench_export.py --samples 8 --skip-peer

1. qcore -> compressed-tensors and ascendv1: GPTQ W4A16 g64 (act-order, static groups) and
   SmoothQuant W8A8 (default options) quantized by qcore, exported with `qcore export`
   to both formats (ascendv1 read back by qcore's reader). compressed-tensors is checked by
   compressed-tensors' own dequantizer (tensors differing from qcore's dequantized weights:
   must be 0) and by transformers' loader (`CompressedTensorsConfig(dequantize=True)`, and
   for W8A8 also the compressed load, which quantizes activations): its perplexity over
   qcore's on the same windows.
2. llm-compressor -> qcore: llm-compressor 0.14 (its own venv, /work/llmc-venv, see
   DESIGN.md) quantizes GPTQ W4A16 g64 (actorder static) and W8A8 (QuantizationModifier,
   int8 per-channel weights, per-token dynamic activations), measures its own perplexity
   in memory and saves compressed; qcore loads each folder into QuantLinear modules
   (packed, never dequantized to float) and measures its perplexity.

Perplexity: the same function on both sides (benchmarks/_common.py), the first 16 windows
of 512 tokens of the wiki tail; calibration from the head.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import _common as common

HERE = Path(__file__).resolve()
COLUMNS = ["direction", "case", "reader", "qcore ppl", "other ppl", "ratio", "CT mismatches",
           "seconds", "quant s"]


# ----------------------------------------------------------------------------- peer side
def peer_recipe(case: str):
    """llm-compressor's modifier of one case: GPTQ W4A16 g64 act-order, or W8A8 RTN."""
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier

    if case == "gptq-w4a16":
        return GPTQModifier(config_groups={"group_0": common.llmc_group_scheme(4, 64)},
                            ignore=["lm_head"], block_size=128, dampening_frac=0.01,
                            actorder="static")
    scheme = common.llmc_channel_token_scheme(8, symmetric_activations=True)
    return QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])


def worker_llmc(a: argparse.Namespace) -> dict:
    """llm-compressor quantizes, measures its own perplexity, saves compressed."""
    out = {}
    for case in ("gptq-w4a16", "w8a8"):
        model, tokenizer, calib, eval_ids = common.peer_inputs(a)  # a fresh float model each
        seconds = common.llmc_oneshot(model, tokenizer, calib, peer_recipe(case))
        ppl = common.window_perplexity(model, eval_ids, batch_size=1)
        folder = Path(a.out) / case
        model.save_pretrained(folder, save_compressed=True)
        tokenizer.save_pretrained(folder)
        out[case] = {"ppl": ppl, "seconds": seconds, "folder": str(folder)}
    return out


# ----------------------------------------------------------------------------- qcore side
def _qcore_quantize(folder: Path, calib: Path, method: str, scheme: str, group_size, options,
                    save: Path, activation_range: str = "signed"):
    """qcore's run through the API with the benchmark's calibration token windows."""
    import torch

    from qcore import api
    from qcore.engine.pipeline import run_layerwise
    from qcore.plugins import PluginManager
    from qcore.schemes import get_scheme

    plugins = PluginManager()
    model, tokenizer, _ = api.load_model(str(folder), plugins)
    resolved = get_scheme(scheme, group_size)
    if resolved.activations is not None:
        resolved = resolved.model_copy(update={"activations": resolved.activations.model_copy(
            update={"symmetric_range": activation_range})})
    quantizer = api.build_quantizer(method, resolved, options, plugins)
    backend = api.build_backend("cpu", plugins)
    t0 = time.perf_counter()
    report = run_layerwise(model, quantizer, api.adapter_for(model, plugins), backend,
                           torch.load(calib), plugins=plugins, progress=False)
    seconds = time.perf_counter() - t0
    backend.install_kernels(model)
    api.save_model(model, tokenizer, save, {"report": report.model_dump(mode="json")},
                   plugins=plugins)
    return model, seconds


def _ct_mismatches(model, ct_dir: Path, work: Path) -> int:
    """Quantized linears whose weight compressed-tensors' own dequantizer does not
    reproduce bit for bit."""
    import torch
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import (
        CompressedTensorsDequantizer,
    )
    from safetensors.torch import load_file

    from qcore.quant.linear import QuantLinear

    floats = ["re:.*embed_tokens$", "re:.*norm$", "lm_head"]
    convert_checkpoint(ct_dir, work, CompressedTensorsDequantizer(
        ct_dir, ignore=floats, dtype=torch.float32), max_workers=1, device="cpu")
    dense = {}
    for file in work.glob("*.safetensors"):
        dense.update(load_file(str(file)))
    return sum(not torch.equal(dense[f"{n}.weight"], m.dequantize())
               for n, m in model.named_modules() if isinstance(m, QuantLinear))


def qcore_to_ct(a: argparse.Namespace, folder: Path, calib: Path, eval_ids: Path,
                work: Path) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from qcore import api

    rows = []
    ids = torch.load(eval_ids)
    cases = [("GPTQ W4A16 g64 act-order", "gptq", "W4A16", 64,
              {"act_order": True, "static_groups": True}, "signed"),
             ("SmoothQuant W8A8", "smoothquant", "W8A8", None, {}, "signed"),
             ("SmoothQuant W8A8, activations max|x|/127.5 (symmetric_range full)",
              "smoothquant", "W8A8", None, {}, "full")]
    for label, method, scheme, group_size, options, act_range in cases:
        tag = f"{method}-{act_range}"
        saved = work / f"qcore-{tag}"
        model, seconds = _qcore_quantize(folder, calib, method, scheme, group_size, options,
                                         saved, act_range)
        q_ppl = common.window_perplexity(model, ids, batch_size=1)
        t0 = time.perf_counter()
        ct_dir = work / f"ct-{tag}"
        api.export_model(str(saved), "compressed-tensors", ct_dir)
        export_s = time.perf_counter() - t0
        mismatches = _ct_mismatches(model, ct_dir, work / f"deq-{tag}")
        if act_range == "signed":  # ascendV1's npu_dynamic_quant divides by 127
            asc_dir = work / f"ascend-{tag}"
            api.export_model(str(saved), "ascendv1", asc_dir)
            back, _, _ = api.load_model(str(asc_dir))
            asc_ppl = common.window_perplexity(back, ids, batch_size=1)
            rows.append({"direction": "qcore -> ascendv1", "case": label,
                         "reader": "qcore's ascendv1 reader", "qcore ppl": q_ppl,
                         "other ppl": asc_ppl, "ratio": asc_ppl / q_ppl,
                         "CT mismatches": "-", "seconds": 0.0, "quant s": seconds})
            del back
        loads = {"dequantize=True": CompressedTensorsConfig(dequantize=True)}
        if scheme == "W8A8":
            loads["compressed"] = None
        for how, qconfig in loads.items():
            kwargs = {"quantization_config": qconfig} if qconfig is not None else {}
            row = {"direction": "qcore -> compressed-tensors", "case": label,
                   "reader": f"transformers ({how})", "qcore ppl": q_ppl,
                   "CT mismatches": mismatches, "seconds": export_s, "quant s": seconds}
            try:
                hf = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32,
                                                          **kwargs)
                hf_ppl = common.window_perplexity(hf.eval(), ids, batch_size=1)
                row.update({"other ppl": hf_ppl, "ratio": hf_ppl / q_ppl})
                del hf
            except Exception as exc:  # noqa: BLE001 - a reader's failure is a result
                row.update({"other ppl": f"failed: {type(exc).__name__}: {exc}"[:120],
                            "ratio": "-"})
            rows.append(row)
    return rows


def ct_to_qcore(peer: dict, eval_ids: Path) -> list[dict]:
    import torch

    from qcore import api
    from qcore.quant.linear import QuantLinear

    rows = []
    ids = torch.load(eval_ids)
    for case, result in peer.items():
        t0 = time.perf_counter()
        model, _, meta = api.load_model(result["folder"])
        load_s = time.perf_counter() - t0
        n_quant = sum(isinstance(m, QuantLinear) for m in model.modules())
        ppl = common.window_perplexity(model, ids, batch_size=1)
        rows.append({"direction": "llm-compressor -> qcore", "case": case,
                     "reader": f"qcore ({n_quant} QuantLinear, {meta['format']})",
                     "qcore ppl": ppl, "other ppl": result["ppl"],
                     "ratio": ppl / result["ppl"], "CT mismatches": "-",
                     "seconds": load_s, "quant s": result["seconds"]})
    return rows


def peer_rows(a: argparse.Namespace, wiki: common.WikiFiles, work: Path) -> list[dict]:
    """llm-compressor's side in its own process, then qcore reading what it saved."""
    if not common.PEER_PYTHON.exists():
        raise SystemExit(f"{common.PEER_PYTHON} is missing: build the llm-compressor venv "
                         "(DESIGN.md) or pass --skip-peer")
    peer = common.run_cell(HERE, "llmc", {**wiki.worker_flags(a.samples), "out": work / "llmc",
                                          "threads": a.threads})
    if "error" in peer:
        raise SystemExit(f"llm-compressor side failed: {peer['error']}")
    peer = {k: v for k, v in peer.items() if isinstance(v, dict)}
    return ct_to_qcore(peer, wiki.eval)


def table_cell(row: dict, column: str) -> str:
    """Perplexities to 4 decimals, ratios to 5, other floats to 1, the rest as text."""
    value = row[column]
    if not isinstance(value, float):
        return str(value)
    if column in ("qcore ppl", "other ppl"):
        return f"{value:.4f}"
    return f"{value:.5f}" if column == "ratio" else f"{value:.1f}"


def parse_args() -> argparse.Namespace:
    """The parent's flags; a worker process (hidden --worker) runs its cell and exits."""
    p = common.benchmark_parser(__doc__)
    common.add_wiki_flags(p, samples=32)
    common.add_threads_flag(p)
    p.add_argument("--skip-peer", action="store_true", help="qcore -> compressed-tensors only")
    common.add_worker_flags(p, ["llmc"], "--out")
    return common.parse_args_or_run_worker(p, {"llmc": worker_llmc})


def main() -> None:
    a = parse_args()
    import torch

    torch.set_num_threads(a.threads)
    wiki = common.smollm2_wiki_files(a, [a.samples], "bench_export_")
    work = wiki.folder
    rows = qcore_to_ct(a, wiki.model, wiki.calib[a.samples], wiki.eval, work)
    if not a.skip_peer:
        rows += peer_rows(a, wiki, work)

    print(f"\nSmolLM2-135M, {a.samples} x {a.seq_len} wiki head calibration, perplexity on "
          f"{a.eval_windows} x {a.seq_len} wiki tail windows ({a.threads} threads)\n")
    common.print_table(COLUMNS, [[table_cell(r, c) for c in COLUMNS] for r in rows])
    print("\n'seconds': export (qcore -> CT) or qcore's load of the peer folder; 'quant s': "
          "the quantization on that side.")


if __name__ == "__main__":
    main()
