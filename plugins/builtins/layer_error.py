"""The ``layer-error`` evaluator: each decoder layer's relative output error against the
float reference model, on the same token windows, two ways (the study's layer-wise
instability figure):

* ``alone``: every quantized layer fed the float model's inputs to that layer, so each
  layer is judged by itself;
* ``accumulated``: the quantized model run on its own outputs, so the error builds up.

Relative error: ``||y_q - y_fp||^2 / ||y_fp||^2`` over the windows. On a backend other
than the CPU oracle the same is computed on the CPU too, so the curves show where the
hardware diverges. Outputs: metrics (means, worst layer), per-layer rows in the details
(the CLI prints them as a table), and a PNG plot (matplotlib, optional: without it the
JSON and the table are still written, and the result says why there is no plot).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.console import Steps
from qcore.data import WindowSpec, token_windows, tokenize
from qcore.hookspecs import hookimpl
from qcore.interfaces import Backend, DataSpec, EvaluationResources, Evaluator
from qcore.models.capture import capture_first_layer_inputs
from qcore.quant.metrics import relative_mse
from qcore.reports import EvaluationResult

log = logging.getLogger(__name__)


class LayerErrorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reference: str = Field(description="the float model (folder, .gguf, hub id, 'smollm2')")
    data: DataSpec = Field(description="text whose first windows are run")
    seq_len: int = Field(default=512, gt=1)
    windows: int = Field(default=4, gt=0, description="first N windows")
    batch_size: int = Field(default=2, gt=0)
    plot: str | None = Field(default=None, description="PNG path, which must not exist "
                             "(default: layer-error-<time>.png here); 'none' for no plot")
    progress: bool | None = Field(default=None, description="a live bar with the time left "
                                  "(None: on a terminal only; True: a line per layer elsewhere)")


@torch.no_grad()
def layer_errors(model: nn.Module, reference: nn.Module, ids: torch.Tensor, backend: Backend,
                 batch_size: int, adapters: tuple[Any, Any], progress: bool | None = None
                 ) -> list[dict[str, float]]:
    """Per layer: relative error of the quantized layer alone and accumulated."""
    q_adapter, fp_adapter = adapters
    # each model's own layer keyword arguments (its attention implementation's masks)
    fp_x, fp_kw = capture_first_layer_inputs(reference, fp_adapter, ids, backend, batch_size)
    q_x, q_kw = capture_first_layer_inputs(model, q_adapter, ids, backend, batch_size)
    rows = []
    q_layers, fp_layers = q_adapter.decoder_layers(), fp_adapter.decoder_layers()
    if len(q_layers) != len(fp_layers):
        raise ValueError(f"the model has {len(q_layers)} decoder layers, the reference "
                         f"{len(fp_layers)}: not the same architecture")
    with Steps(f"layer error on {backend.name}", len(q_layers), progress) as steps:
        for i, (q_layer, fp_layer) in enumerate(zip(q_layers, fp_layers, strict=True)):
            fp_y = [_out(fp_layer(x, **kw)) for x, kw in zip(fp_x, fp_kw, strict=True)]
            alone = [_out(q_layer(x, **kw)) for x, kw in zip(fp_x, q_kw, strict=True)]
            acc = [_out(q_layer(x, **kw)) for x, kw in zip(q_x, q_kw, strict=True)]
            rows.append({"layer": i, "name": q_adapter.layer_prefix(i),
                         "alone": relative_mse(fp_y, alone),
                         "accumulated": relative_mse(fp_y, acc)})
            fp_x, q_x = fp_y, acc
            steps.advance(info=f"{rows[-1]['name']}: alone {rows[-1]['alone']:.2e}")
    return rows


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def plot_curves(curves: dict[str, list[dict[str, float]]], path: Path, title: str) -> str | None:
    """Write the per-layer error curves (log scale) to ``path``; None, or why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib): no plot written"
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, rows in curves.items():
        layers = [r["layer"] for r in rows]
        ax.plot(layers, [r["alone"] for r in rows], marker="o", label=f"{label}: alone")
        ax.plot(layers, [r["accumulated"] for r in rows], marker="s", linestyle="--",
                label=f"{label}: accumulated")
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("relative output error ||y_q - y_fp||^2 / ||y_fp||^2")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # a half-written PNG never takes the name
    return None


class LayerError(Evaluator):
    name = "layer-error"
    Config = LayerErrorConfig
    description = "per-layer output error vs the float model, alone and accumulated (+ plot)"
    summary_metrics = ("max_alone", "worst_over_median", "worst_layer", "final_accumulated")

    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend,
                 texts: EvaluationResources
                 ) -> EvaluationResult:
        cfg: LayerErrorConfig = self.config
        plot = None
        if (cfg.plot or "").lower() != "none":
            plot = Path(cfg.plot or f"layer-error-{time.strftime('%Y%m%d-%H%M%S')}.png")
            if plot.exists():  # never replace a file this run did not write
                raise ValueError(f"plot {plot} exists; name another file with plot= (or "
                                 "plot=none)")
        n = cfg.windows
        try:
            ids = token_windows(tokenize(tokenizer, texts.text(cfg.data)),
                                WindowSpec(samples=n, seq_len=cfg.seq_len))
        except ValueError as exc:
            raise ValueError(f"{cfg.data.source}: {exc}") from exc
        reference, _, meta = texts.load_model(cfg.reference)
        if meta is not None:
            raise ValueError(f"reference {cfg.reference} is a quantized model; give the "
                             "float one")
        adapters = (texts.adapter_for(model), texts.adapter_for(reference))
        model.eval()
        curves = {backend.name: layer_errors(model, reference, ids, backend, cfg.batch_size,
                                             adapters, cfg.progress)}
        if backend.name != "cpu":
            cpu = texts.backend("cpu")
            cpu.install_kernels(model)
            curves["cpu"] = layer_errors(model.to(cpu.device), reference, ids, cpu,
                                         cfg.batch_size, adapters, cfg.progress)
        rows = curves[backend.name]
        worst = max(rows, key=lambda r: r["alone"])
        alone = sorted(r["alone"] for r in rows)
        metrics = {"mean_alone": sum(alone) / len(alone),
                   "median_alone": alone[len(alone) // 2],
                   "max_alone": worst["alone"], "worst_layer": float(worst["layer"]),
                   "worst_over_median": worst["alone"] / max(alone[len(alone) // 2], 1e-30),
                   "final_accumulated": rows[-1]["accumulated"],
                   "max_accumulated": max(r["accumulated"] for r in rows)}
        details: dict[str, Any] = {"reference": cfg.reference, "windows": n,
                                   "seq_len": cfg.seq_len, "curves": curves,
                                   "table": [{"backend": b, **r} for b, rs in curves.items()
                                             for r in rs]}
        if plot is not None:
            why = plot_curves(curves, plot, f"layer-wise error vs {cfg.reference}")
            if why:
                log.warning("%s", why)
                details["plot_skipped"] = why
            else:
                details["plot"] = str(plot)
        return EvaluationResult(evaluator=self.name, metrics=metrics, details=details)


@hookimpl
def qcore_register_evaluators(register):
    register(LayerError)
