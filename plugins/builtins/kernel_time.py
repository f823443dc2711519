"""Where a quantized model's forward time goes: the ``kernel-time`` evaluator.

It profiles forwards over the first windows of a text with ``torch.profiler`` and sums the
ranges real integer kernels mark (:mod:`qcore.profiling`): the run-time (dynamic)
activation quantization and the integer GEMM. The study's fourth finding, an INT8
deployment limited by its dynamic-quantization overhead, is stated from these shares.

The times are host (CPU) times under the profiler, whose bookkeeping adds a few
microseconds per range; on an asynchronous device (NPU) they are launch times unless the
device runs synchronously (``ASCEND_LAUNCH_BLOCKING=1``).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.data import WindowSpec, token_windows, tokenize
from qcore.hookspecs import hookimpl
from qcore.interfaces import Backend, DataSpec, Evaluator, TextSource
from qcore.profiling import ACTIVATION_QUANT, INT_GEMM
from qcore.reports import EvaluationResult

FORWARD = "qcore::forward"


class KernelTimeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataSpec = Field(default=DataSpec(source="pydoc"), description="text whose first "
                           "windows are run")
    seq_len: int = Field(default=512, gt=1)
    windows: int = Field(default=2, gt=0, description="windows profiled (after one warm-up "
                                                      "forward)")
    batch_size: int = Field(default=1, gt=0)


class KernelTime(Evaluator):
    name = "kernel-time"
    Config = KernelTimeConfig
    description = "share of forward time in dynamic activation quantization and int GEMMs"
    summary_metrics = ("activation_quant_share_of_int_linear", "forward_seconds")

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend, texts: TextSource
                 ) -> EvaluationResult:
        cfg: KernelTimeConfig = self.config
        try:
            ids = token_windows(tokenize(tokenizer, texts.text(cfg.data)),
                                WindowSpec(samples=cfg.windows, seq_len=cfg.seq_len))
        except ValueError as exc:
            raise ValueError(f"{cfg.data.source}: {exc}") from exc
        model.eval()
        model.to(backend.device)
        batches = [ids[b: b + cfg.batch_size].to(backend.device)
                   for b in range(0, len(ids), cfg.batch_size)]
        model(input_ids=batches[0], use_cache=False)  # warm-up: packing, caches
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for batch in batches:
                with torch.profiler.record_function(FORWARD):
                    model(input_ids=batch, use_cache=False)
        totals = {e.key: (e.cpu_time_total / 1e6, e.count) for e in prof.key_averages()
                  if e.key in (FORWARD, ACTIVATION_QUANT, INT_GEMM)}
        forward = totals.get(FORWARD, (0.0, 0))[0]
        quant, calls = totals.get(ACTIVATION_QUANT, (0.0, 0))
        gemm = totals.get(INT_GEMM, (0.0, 0))[0]
        metrics = {
            "forward_seconds": forward / len(batches),
            "activation_quant_seconds": quant / len(batches),
            "int_gemm_seconds": gemm / len(batches),
            "activation_quant_share": quant / forward if forward else 0.0,
            "int_gemm_share": gemm / forward if forward else 0.0,
            "activation_quant_share_of_int_linear": quant / (quant + gemm) if calls else 0.0,
            "int_kernel_calls": float(calls),
        }
        details: dict[str, Any] = {"windows": cfg.windows, "seq_len": cfg.seq_len,
                                   "backend": backend.name}
        if not calls:
            details["note"] = ("no real integer kernel ran (a weight-only or float model, or "
                               "a backend without one): the shares are 0")
        return EvaluationResult(evaluator=self.name, metrics=metrics, details=details)


@hookimpl
def qcore_register_evaluators(register):
    register(KernelTime)
