"""The study's four findings, each stated from the cells it has, with its numbers, or
naming the cells it lacks:

1. 4-bit weight-only quantization is viable, and how its gap changes with model size;
2. 4-bit weights + activations, and how unevenly its error falls on the layers;
3. 8-bit is stable;
4. the INT8 kernel's time in dynamic activation quantization.

The sentences report measurements; whether they confirm the published study is for the
reader to judge from the numbers.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from qcore_study.grid import BASELINE
from qcore_study.table import first_metric


class Finding(BaseModel):
    id: str
    title: str
    statement: str | None = None
    missing: str | None = None
    numbers: dict[str, Any] = {}


def _ppl(row: dict[str, Any]) -> float | None:
    return first_metric(row, "perplexity")


def _baselines(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["model"], r["backend"]): r for r in rows if r["method"] == BASELINE}


def _gap(row: dict[str, Any], base: dict[tuple[str, str], dict[str, Any]]) -> float | None:
    """Perplexity increase over the float baseline, in percent."""
    fp = base.get((row["model"], row["backend"]))
    ppl, ref = _ppl(row), _ppl(fp) if fp else None
    if ppl is None or not ref:
        return None
    return (ppl / ref - 1) * 100


def layer_spread(row: dict[str, Any]) -> tuple[float, int, float] | None:
    """(worst layer's error over the median layer's, worst layer index, worst error):
    from the layer-error evaluator when it ran, else from the pipeline's per-layer
    relative MSE."""
    ratio, layer, worst = (first_metric(row, k) for k in ("worst_over_median", "worst_layer",
                                                     "max_alone"))
    if ratio is not None and layer is not None and worst is not None:
        return ratio, int(layer), worst
    errors = [x["relative_mse"] for x in row["layers"]]
    if not errors:
        return None
    median = sorted(errors)[len(errors) // 2]
    k = max(range(len(errors)), key=errors.__getitem__)
    return errors[k] / max(median, 1e-30), k, errors[k]


def _scheme_rows(rows: list[dict[str, Any]], scheme: str) -> list[dict[str, Any]]:
    return [r for r in rows if r["scheme"] == scheme and r["status"] == "ok"]


def weight_only(rows: list[dict[str, Any]]) -> Finding:
    f = Finding(id="weight-only-4bit", title="4-bit weight-only quantization")
    base = _baselines(rows)
    cells = [(r, _gap(r, base)) for r in _scheme_rows(rows, "W4A16")]
    cells = [(r, g) for r, g in cells if g is not None]
    if not cells:
        f.missing = ("needs a finished W4A16 cell and its model's float baseline, both with "
                     "perplexity")
        return f
    parts, per_model = [], {}
    for model in dict.fromkeys(r["model"] for r, _ in cells):
        mine = sorted(((r, g) for r, g in cells if r["model"] == model), key=lambda x: x[1])
        (best, g_best), (worst, g_worst) = mine[0], mine[-1]
        fp = base[(best["model"], best["backend"])]
        per_model[model] = {"best": best["method"], "best_gap_pct": g_best,
                            "worst": worst["method"], "worst_gap_pct": g_worst,
                            "parameters": fp["parameters"]}
        text = (f"on {model} the best method ({best['method']}) is within {g_best:.1f}% of "
                f"float perplexity ({_ppl(best):.2f} vs {_ppl(fp):.2f})")
        if len(mine) > 1:
            text += f", the worst ({worst['method']}) {g_worst:.1f}%"
        acc, ref = first_metric(best, "pass@1"), first_metric(fp, "pass@1")
        if acc is not None and ref is not None:
            text += f"; pass@1 {acc:.3f} vs {ref:.3f}"
        w3 = [(r, _gap(r, base)) for r in _scheme_rows(rows, "W3A16") if r["model"] == model]
        w3 = [(r, g) for r, g in w3 if g is not None]
        if w3:
            r3, g3 = min(w3, key=lambda x: x[1])
            text += f"; at 3 bits the best ({r3['method']}) is {g3:.1f}%"
        parts.append(text)
    f.numbers = per_model
    f.statement = "W4A16: " + "; ".join(parts) + "."
    sized = sorted((v["parameters"], m, v["best_gap_pct"]) for m, v in per_model.items()
                   if v["parameters"])
    if len(sized) >= 2:
        trend = " -> ".join(f"{m} ({p / 1e9:.2g}B params) {g:.1f}%" for p, m, g in sized)
        shrinks = all(b[2] <= a[2] for a, b in zip(sized, sized[1:], strict=False))
        verdict = "shrinks" if shrinks else "does not shrink monotonically"
        f.statement += f" With size the best gap {verdict}: {trend}."
    else:
        f.statement += " (One model: the trend with size needs a second model.)"
    return f


def weight_activation(rows: list[dict[str, Any]]) -> Finding:
    f = Finding(id="weight-activation-4bit", title="4-bit weights and activations, layer by "
                                                   "layer")
    base = _baselines(rows)
    cells = [r for r in _scheme_rows(rows, "W4A4") if _gap(r, base) is not None]
    if not cells:
        f.missing = ("needs a finished W4A4 cell and its model's float baseline, both with "
                     "perplexity")
        return f
    parts = []
    for r in sorted(cells, key=lambda r: _gap(r, base)):
        fp = base[(r["model"], r["backend"])]
        ratio = _ppl(r) / _ppl(fp)
        text = f"{r['model']} {r['method']} at {ratio:.2f}x float perplexity"
        spread = layer_spread(r)
        if spread is not None:
            text += (f", worst-layer error {spread[0]:.1f}x the median (layer {spread[1]}, "
                     f"relative MSE {spread[2]:.2e})")
        for metric in ("repetition_rate", "truncated_rate"):
            value = first_metric(r, metric)
            if value is not None:
                text += f", {metric.replace('_', ' ')} {value:.2f}"
        f.numbers[f"{r['model']}/{r['method']}"] = {"ppl_ratio": ratio,
                                                    "layer_spread": spread}
        parts.append(text)
    w4 = [layer_spread(r) for r in _scheme_rows(rows, "W4A16")]
    w4 = [s for s in w4 if s is not None]
    f.statement = "W4A4: " + "; ".join(parts) + "."
    if w4:
        f.statement += (f" For comparison, W4A16's worst layer is at most "
                        f"{max(s[0] for s in w4):.1f}x its median.")
    return f


def eight_bit(rows: list[dict[str, Any]]) -> Finding:
    f = Finding(id="eight-bit", title="8-bit quantization")
    base = _baselines(rows)
    cells = [r for s in ("W8A8", "W8A16", "W8A8KV8") for r in _scheme_rows(rows, s)
             if _gap(r, base) is not None]
    if not cells:
        f.missing = ("needs a finished W8A8 or W8A16 cell and its model's float baseline, "
                     "both with perplexity")
        return f
    parts = []
    for r in cells:
        gap = _gap(r, base)
        spread = layer_spread(r)
        text = f"{r['model']} {r['method']} {r['scheme']} within {gap:.2f}% of float"
        if spread is not None:
            text += f" (worst layer relative MSE {spread[2]:.2e})"
        f.numbers[f"{r['model']}/{r['method']}/{r['scheme']}"] = {"gap_pct": gap}
        parts.append(text)
    f.statement = "8-bit: " + "; ".join(parts) + "."
    return f


def int8_kernel(rows: list[dict[str, Any]]) -> Finding:
    f = Finding(id="int8-kernel", title="INT8 deployment: dynamic quantization overhead")
    cells = [r for r in _scheme_rows(rows, "W8A8")
             if (first_metric(r, "int_kernel_calls") or 0) > 0]
    if not cells:
        f.missing = ("needs a finished W8A8 cell evaluated with kernel-time on a backend "
                     "with a real int8 kernel")
        return f
    base = _baselines(rows)
    parts = []
    for r in cells:
        share = first_metric(r, "activation_quant_share_of_int_linear")
        whole = first_metric(r, "activation_quant_share")
        fwd = first_metric(r, "forward_seconds")
        text = (f"{r['model']} {r['method']} on {r['backend']}: {100 * share:.0f}% of the int8 "
                f"linears' time is dynamic activation quantization ({100 * whole:.0f}% of the "
                "forward)")
        fp = base.get((r["model"], r["backend"]))
        fp_fwd = first_metric(fp, "forward_seconds") if fp else None
        if fwd and fp_fwd:
            text += f"; the W8A8 forward takes {fwd / fp_fwd:.2f}x the float one's time"
        f.numbers[f"{r['model']}/{r['method']}/{r['backend']}"] = {
            "quant_share_of_int_linear": share, "quant_share_of_forward": whole,
            "forward_vs_float": fwd / fp_fwd if fwd and fp_fwd else None}
        parts.append(text)
    f.statement = "INT8 kernel: " + "; ".join(parts) + "."
    return f


def findings(rows: list[dict[str, Any]]) -> list[Finding]:
    return [weight_only(rows), weight_activation(rows), eight_bit(rows), int8_kernel(rows)]


def findings_markdown(items: list[Finding]) -> str:
    lines = ["# Findings", ""]
    for i, f in enumerate(items, 1):
        lines.append(f"{i}. **{f.title}.** " + (f.statement or f"Not stated: {f.missing}."))
    return "\n".join(lines) + "\n"
