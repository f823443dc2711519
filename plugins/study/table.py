"""The study's table: one row per cell (model x method x scheme x backend) read back from
the cache, written as Markdown, CSV and JSON.

Columns: the scheme's bits, each evaluator's summary metrics (``perplexity``, ``pass@1``
and the collapse rates, the layer-wise error ratios, the INT8 kernel's quantization
share), perplexity relative to the model's float baseline, model size, quantization time
and peak memory. The CSV and JSON carry every metric; Markdown and the terminal the
summary ones."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from qcore.io import atomic_write_json, atomic_write_text
from qcore.plugins import PluginManager
from qcore.schemes import get_scheme
from qcore_study.cache import CellFolder
from qcore_study.cells import QUANTIZE, CellPlan
from qcore_study.grid import BASELINE

FIXED = ("model", "method", "scheme", "backend", "status")
TAIL = ("size_mb", "quant_seconds", "peak_rss_mb")


def scheme_bits(scheme: str, group_size: int | None = None) -> tuple[float, float]:
    """(weight bits, activation bits) of a scheme name; the baseline is 16/16 for plots
    (the float model's own dtype is in ``size_mb``)."""
    if scheme == BASELINE:
        return 16.0, 16.0
    s = get_scheme(scheme, group_size)
    return float(s.weights.bits), float(s.activations.bits if s.activations else 16)


def metric_columns(plans: list[CellPlan], plugins: PluginManager) -> list[tuple[str, str, str]]:
    """(column, evaluator label, metric) for the summary metrics, in grid order. A column
    is the bare metric name unless two evaluators would share it."""
    entries: dict[str, str] = {}
    for plan in plans:
        for e in plan.cell.evaluators:
            entries.setdefault(e.label, e.evaluator)
    wanted = []
    for label, evaluator in entries.items():
        cls = plugins.registry("evaluator").get(evaluator)
        for metric in getattr(cls, "summary_metrics", ()) or ():
            wanted.append((label, metric))
    names = [m for _, m in wanted]
    return [(m if names.count(m) == 1 else f"{label}:{m}", label, m) for label, m in wanted]


def first_metric(row: dict[str, Any], name: str) -> float | None:
    """A row's metric ``name`` from the first evaluator (in grid order) that measured it."""
    for metrics in row["evals"].values():
        if metrics.get(name) is not None:
            return metrics[name]
    return None


def build_rows(plans: list[CellPlan], root: Path) -> list[dict[str, Any]]:
    """Every cell's row: identity, status (``ok``, ``failed``, ``incomplete``), errors,
    the quantization record and each evaluator's metrics (``evals[label]``)."""
    rows = []
    for plan in plans:
        cell, folder = plan.cell, CellFolder(root, plan.key)
        quant = folder.read_quant()
        evals, errors = {}, {}
        failure = folder.read_failure(QUANTIZE) or folder.read_failure("worker")
        if failure is not None:
            errors[QUANTIZE] = failure.error
        for e, ekey in plan.evaluators():
            record = folder.read_eval(e.label, ekey)
            if record is not None:
                evals[e.label] = record.metrics
            else:
                failed = folder.read_failure(f"eval-{e.label}")
                if failed is not None:
                    errors[e.label] = failed.error
        complete = quant is not None and len(evals) == len(plan.cell.evaluators)
        group = cell.run.resolved_scheme().weights.group_size if cell.run else None
        w_bits, a_bits = scheme_bits(cell.scheme, cell.run.group_size if cell.run else None)
        rows.append({
            "model": cell.model.label, "method": cell.method.label if cell.method else BASELINE,
            "scheme": cell.scheme, "backend": cell.backend,
            "status": "ok" if complete else ("failed" if errors else "incomplete"),
            "errors": errors, "w_bits": w_bits, "a_bits": a_bits, "group_size": group,
            "key": plan.key,
            "size_mb": quant.model_bytes / 2**20 if quant else None,
            "quant_seconds": quant.seconds if quant else None,
            "peak_rss_mb": quant.peak_rss_mb if quant else None,
            "parameters": quant.parameters if quant else None,
            "layers": quant.layers if quant else [],
            "evals": evals,
        })
    _relative_to_baseline(rows)
    return rows


def _relative_to_baseline(rows: list[dict[str, Any]]) -> None:
    """``ppl_vs_fp``: each cell's first perplexity over its model's float baseline's."""
    base = {(r["model"], r["backend"]): r for r in rows if r["method"] == BASELINE}
    for row in rows:
        fp = base.get((row["model"], row["backend"]))
        row["ppl_vs_fp"] = None
        if fp is None:
            continue
        for label, metrics in row["evals"].items():
            ref = fp["evals"].get(label, {}).get("perplexity")
            value = metrics.get("perplexity")
            if ref and value is not None:
                row["ppl_vs_fp"] = value / ref
                break


def summary(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]]
            ) -> tuple[list[str], list[list[Any]]]:
    """Header and cells of the summary table (values unformatted; None = not measured)."""
    header = [*FIXED, *(c for c, _, _ in columns), "ppl_vs_fp", *TAIL]
    body = []
    for r in rows:
        values = [r[k] for k in FIXED]
        values += [r["evals"].get(label, {}).get(metric) for _, label, metric in columns]
        values += [r["ppl_vs_fp"], *(r[k] for k in TAIL)]
        body.append(values)
    return header, body


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
        return f"{value:.3e}"
    return str(value)


def markdown(header: list[str], body: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


def flat_csv(rows: list[dict[str, Any]]) -> str:
    """Every metric of every evaluator as ``label.metric`` columns, one row per cell."""
    metric_cols = sorted({f"{label}.{m}" for r in rows for label, ms in r["evals"].items()
                          for m in ms})
    base = [*FIXED, "w_bits", "a_bits", "group_size", "ppl_vs_fp", *TAIL, "parameters", "key"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*base, *metric_cols, "errors"])
    for r in rows:
        flat = {f"{label}.{m}": v for label, ms in r["evals"].items() for m, v in ms.items()}
        writer.writerow([*("" if r[k] is None else r[k] for k in base),
                         *("" if flat.get(c) is None else flat[c] for c in metric_cols),
                         "; ".join(f"{k}: {v}" for k, v in r["errors"].items())])
    return buf.getvalue()


def write_tables(rows: list[dict[str, Any]], columns: list[tuple[str, str, str]], root: Path,
                 extra: dict[str, Any]) -> dict[str, str]:
    """results.md, results.csv, results.json under ``root`` (atomically); their paths."""
    header, body = summary(rows, columns)
    files = {"markdown": root / "results.md", "csv": root / "results.csv",
             "json": root / "results.json"}
    atomic_write_text(files["markdown"], markdown(header, body))
    atomic_write_text(files["csv"], flat_csv(rows))
    atomic_write_json(files["json"], {**extra, "rows": rows})
    return {k: str(v) for k, v in files.items()}
