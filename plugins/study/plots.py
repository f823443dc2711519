"""The study's plots (matplotlib, an optional extra imported here only): per model, the
perplexity against weight bits for each method (the float baseline as a dashed line), and
the layer-wise error curves for each scheme (each layer's output relative MSE as the
quantization pipeline measured it)."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from qcore_study.grid import BASELINE
from qcore_study.table import first_metric

log = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    tmp.replace(path)  # a half-written PNG never takes the name


def write_plots(rows: list[dict[str, Any]], root: Path) -> tuple[list[str], str | None]:
    """(PNG paths written, why none were when matplotlib is missing)."""
    try:
        plt = _pyplot()
    except ImportError:
        return [], ("plots skipped: matplotlib is not installed (pip install matplotlib, a "
                    "dependency of qcore)")
    out = root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", model)
        path = _metric_vs_bits(plt, mine, out / f"perplexity-vs-bits-{safe}.png", model)
        if path:
            written.append(path)
        path = _layer_curves(plt, mine, out / f"layer-error-{safe}.png", model)
        if path:
            written.append(path)
    return written, None


def _metric_vs_bits(plt: Any, rows: list[dict[str, Any]], path: Path, model: str
                    ) -> str | None:
    points: dict[str, list[tuple[float, float]]] = {}
    baseline = None
    for r in rows:
        ppl = first_metric(r, "perplexity")
        if ppl is None:
            continue
        if r["method"] == BASELINE:
            baseline = ppl
            continue
        series = f"{r['method']} (A{int(r['a_bits'])})" + (
            f" [{r['backend']}]" if r["backend"] != "cpu" else "")
        points.setdefault(series, []).append((r["w_bits"], ppl))
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for series, xy in points.items():
        xy.sort()
        ax.plot([x for x, _ in xy], [y for _, y in xy], marker="o", label=series)
    if baseline is not None:
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1,
                   label=f"float ({baseline:.2f})")
    values = [y for xy in points.values() for _, y in xy] + ([baseline] if baseline else [])
    if max(values) / max(min(values), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("weight bits")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_xticks(sorted({x for xy in points.values() for x, _ in xy}))
    ax.set_title(f"{model}: perplexity vs weight bits")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)
    return str(path)


def _layer_curves(plt: Any, rows: list[dict[str, Any]], path: Path, model: str
                  ) -> str | None:
    schemes = list(dict.fromkeys(r["scheme"] for r in rows if r["layers"]))
    if not schemes:
        return None
    fig, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 3.6),
                             squeeze=False, sharey=True)
    for ax, scheme in zip(axes[0], schemes, strict=True):
        for r in rows:
            if r["scheme"] == scheme and r["layers"]:
                errors = [max(x["relative_mse"], 1e-12) for x in r["layers"]]
                ax.plot(range(len(errors)), errors, marker=".", label=r["method"])
        ax.set_yscale("log")
        ax.set_title(scheme)
        ax.set_xlabel("decoder layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("output relative MSE")
    fig.suptitle(f"{model}: layer-wise error per scheme")
    _save(fig, path)
    plt.close(fig)
    return str(path)
