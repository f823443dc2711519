"""qcore's ascendV1 export next to msModelSlim's own, on SmolLM2-135M, from one command.

    python benchmarks/bench_ascendv1.py              # 4 x 512 calibration windows
    python benchmarks/bench_ascendv1.py --samples 8

msModelSlim 26.1.0 runs in its own venv (/work/msmodelslim-venv: `pip install
torch==2.13.0`, then `pip install msmodelslim==26.1.0 transformers`; REFERENCE.md) on a
copy of SmolLM2 whose tokenizer gets a pad token, answering its interactive prompt:

* W8A16: `msmodelslim quant --quant_type w8a16` (its default best practice: int8
  symmetric per-channel min/max weights); qcore: RTN W8A16.
* W8A8: its default-w8a8 practice (iterative smoothing, int8 per-channel weights,
  per-token dynamic activations) with the calibration set replaced by the benchmark's
  windows; qcore: SmoothQuant W8A8 at its defaults (alpha 0.5, per-token dynamic), same
  windows.
* W8A8C8: the same practice plus its ``dynamic_cache`` processor as its w8a8c8 practices
  configure it (int8 symmetric per-channel min/max KV scales: C8); qcore: SmoothQuant
  ``--scheme W8A8C8``.

Then, per scheme: the tensor names, dtypes and shapes of both exports and the keys and
types of both descriptions are compared, and both exports are loaded through qcore's
ascendV1 reader and evaluated with the same perplexity function (the first 16 windows of
512 tokens of the wiki tail; calibration from the head). One process after the other;
seconds: msModelSlim's command (its process, model load included), qcore's load,
quantization and export.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import _common as common

MSMS = Path("/work/msmodelslim-venv/bin/msmodelslim")
PRACTICE = Path("/work/msmodelslim-venv/lib/python3.11/site-packages/msmodelslim/"
                "lab_practice/default/default-w8a8.yaml")


#: msModelSlim's static int8 KV-cache step (lab_practice/qwen3/qwen3-32b-dense-w8a8c8.yaml)
C8_PROCESS = """\
    - type: "dynamic_cache"
      qconfig:
        scope: "per_channel"
        dtype: "int8"
        symmetric: True
        method: "minmax"
      include: [ "*" ]
"""


def _tensors(folder: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors import safe_open

    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for name in f.keys():
                t = f.get_slice(name)
                out[name] = (t.get_dtype(), tuple(t.get_shape()))
    return out


def compare(ours: Path, theirs: Path) -> dict:
    a, b = _tensors(ours), _tensors(theirs)
    da = json.loads((ours / "quant_model_description.json").read_text())
    db = json.loads((theirs / "quant_model_description.json").read_text())
    common = set(a) & set(b)
    return {
        "only_qcore": sorted(set(a) - set(b))[:5], "only_msmodelslim": sorted(set(b) - set(a))[:5],
        "tensors": len(b), "same_names": set(a) == set(b),
        "dtype_or_shape_differs": sorted(n for n in common if a[n] != b[n])[:5],
        "description_keys_equal": set(da) == set(db),
        "types_differ": sorted(k for k in set(da) & set(db) if da[k] != db[k])[:5],
        "model_quant_type": (da.get("model_quant_type"), db.get("model_quant_type")),
    }


def run_msmodelslim(model: Path, out: Path, quant_type: str, config: Path | None) -> float:
    cmd = [str(MSMS), "quant", "--model_type", "default", "--model_path", str(model),
           "--save_path", str(out), "--device", "cpu"]
    cmd += ["--config_path", str(config)] if config else ["--quant_type", quant_type]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, input="y\n", text=True, capture_output=True, env=env)
    if proc.returncode or not (out / "quant_model_description.json").is_file():
        raise SystemExit(f"msModelSlim {quant_type} failed:\n{proc.stdout[-2000:]}\n"
                         f"{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    p = common.benchmark_parser(__doc__)
    common.add_wiki_flags(p, samples=4)
    common.add_threads_flag(p)
    a = p.parse_args()
    if not MSMS.exists():
        raise SystemExit(f"{MSMS} is missing: build msModelSlim's venv (see the docstring)")

    import shutil

    import torch
    from transformers import AutoTokenizer

    from qcore import api
    from qcore.engine.loading import smollm2_folder
    from qcore.schemes import get_scheme

    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_ascendv1_"))
    model = work / "smollm2"
    shutil.copytree(smollm2_folder(), model)
    tok_config = json.loads((model / "tokenizer_config.json").read_text())
    tok_config["pad_token"] = "<|im_end|>"  # msModelSlim needs one; SmolLM2 has none
    (model / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
    files, eval_file = common.write_wiki_windows(model, a.seq_len, a.eval_windows, [a.samples],
                                                 work)
    calib = torch.load(files[a.samples])
    eval_ids = torch.load(eval_file)
    tokenizer = AutoTokenizer.from_pretrained(model)
    jsonl = work / "calib.jsonl"  # the windows as text for msModelSlim (it tokenizes them)
    with jsonl.open("w") as f:
        for row in calib:
            f.write(json.dumps({"inputs_pretokenized": tokenizer.decode(row)}) + "\n")
    practice = PRACTICE.read_text().replace(
        "part_file_size: 4", f'part_file_size: 4\n  dataset: "{jsonl}"')
    config = work / "w8a8.yaml"
    config.write_text(practice)
    config_c8 = work / "w8a8c8.yaml"  # + the KV-cache processor of its w8a8c8 practices
    config_c8.write_text(practice.replace("  runner:", C8_PROCESS + "  runner:"))

    rows, checks = [], {}
    fp, _, _ = api.load_model(str(model))
    rows.append({"side": "float", "scheme": "fp32", "ppl": common.window_perplexity(fp, eval_ids),
                 "seconds": 0.0})
    del fp
    cases = [("W8A16", "w8a16", None, "rtn", "W8A16"),
             ("W8A8", "w8a8", config, "smoothquant", "W8A8"),
             ("W8A8C8", "w8a8c8", config_c8, "smoothquant", "W8A8C8")]
    for label, quant_type, cfg, method, scheme in cases:
        theirs = work / f"msmodelslim-{quant_type}"
        seconds = run_msmodelslim(model, theirs, quant_type, cfg)
        m, _, _ = api.load_model(str(theirs))
        rows.append({"side": "msModelSlim (read by qcore)", "scheme": label,
                     "ppl": common.window_perplexity(m, eval_ids), "seconds": seconds})
        del m
        ours = work / f"qcore-{quant_type}"
        t0 = time.perf_counter()
        qmodel, _, _ = common.quantize_with_qcore(model, files[a.samples], method,
                                                  get_scheme(scheme), {}, a.threads)
        api.build_backend("cpu").install_kernels(qmodel)
        api.save_model(qmodel, tokenizer, ours, {}, format="ascendv1")
        seconds = time.perf_counter() - t0
        rows.append({"side": f"qcore {method}", "scheme": label,
                     "ppl": common.window_perplexity(qmodel, eval_ids), "seconds": seconds})
        del qmodel
        checks[label] = compare(ours, theirs)

    base = rows[0]["ppl"]
    print(f"\nSmolLM2-135M, {a.samples} x {a.seq_len} wiki head calibration (both sides), "
          f"perplexity on {a.eval_windows} x {a.seq_len} wiki tail windows\n")
    common.print_table(["side", "scheme", "ppl", "vs fp", "seconds"],
                       [[r["side"], r["scheme"], f"{r['ppl']:.4f}", f"{r['ppl'] / base:.4f}",
                         f"{r['seconds']:.1f}"] for r in rows])
    print("\nLayout, qcore's export against msModelSlim's for the same scheme:")
    for label, c in checks.items():
        print(f"  {label}: {json.dumps(c)}")


if __name__ == "__main__":
    main()
