"""RTN baseline on SmolLM2-135M: full precision vs RTN W4A16 g64 and W8A16, on offline text.

    python benchmarks/bench_rtn.py [--data pydoc ../shared/data/wiki_en.txt] [--samples 128]

Calibration: the first half of each text (consecutive windows of --seq-len tokens);
evaluation: the first --windows windows of the second half. Prints a table and JSON."""

from __future__ import annotations

import argparse
import copy
import json

import _common as common
from rich.console import Console
from rich.table import Table

from qcore import api
from qcore.config import CalibrationConfig, RunConfig
from qcore.data import tokenize
from qcore.interfaces import DataSpec

SCHEMES = [("W4A16", 64, "RTN W4A16 asym g64"), ("W8A16", None, "RTN W8A16 sym channel")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--data", nargs="+", default=["pydoc", "../shared/data/wiki_en.txt"])
    common.add_wiki_flags(p, samples=128, eval_windows=False)
    p.add_argument("--windows", type=int, default=16)
    args = p.parse_args()

    model, tokenizer, _ = api.load_model("smollm2")
    rows = []
    for source in args.data:
        held_out = DataSpec(source=source, part="tail")
        fp = api.perplexity(model, tokenizer, held_out, seq_len=args.seq_len,
                            windows=args.windows)
        rows.append({"data": source, "method": "fp32", "perplexity": fp, "seconds": 0.0,
                     "peak_rss_mb": None, "calib_windows": 0})
        head_tokens = tokenize(tokenizer, api.datasets().text(DataSpec(source=source,
                                                                        part="head"))).numel()
        samples = min(args.samples, head_tokens // args.seq_len)  # pydoc's head: ~111 windows
        for scheme, group, label in SCHEMES:
            cfg = RunConfig(model="smollm2", method="rtn", scheme=scheme, group_size=group,
                            calibration=CalibrationConfig(
                                data=DataSpec(source=source, part="head"),
                                samples=samples, seq_len=args.seq_len))
            res = api.quantize(cfg, model=copy.deepcopy(model), tokenizer=tokenizer,
                               progress=False)
            ppl = api.perplexity(res.model, tokenizer, held_out, seq_len=args.seq_len,
                                 windows=args.windows)
            rows.append({"data": source, "method": label, "perplexity": ppl,
                         "seconds": res.report.seconds, "peak_rss_mb": res.report.peak_rss_mb,
                         "calib_windows": samples})
    table = Table(title=f"SmolLM2-135M RTN: calib head {args.samples}x{args.seq_len}, "
                        f"eval tail {args.windows}x{args.seq_len}")
    for col in ("data", "method", "calib windows", "perplexity", "vs fp32", "quantize s",
                "peak RSS MB"):
        table.add_column(col)
    fp_of = {r["data"]: r["perplexity"] for r in rows if r["method"] == "fp32"}
    for r in rows:
        table.add_row(r["data"], r["method"], str(r["calib_windows"] or "-"),
                      f"{r['perplexity']:.2f}",
                      f"{100 * (r['perplexity'] / fp_of[r['data']] - 1):+.2f}%",
                      f"{r['seconds']:.1f}",
                      f"{r['peak_rss_mb']:.0f}" if r["peak_rss_mb"] else "-")
    Console().print(table)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
