"""Hooks of the example plugin; only qcore's public API is used."""

from __future__ import annotations

import json
import os

import torch
from pydantic import BaseModel, ConfigDict, Field

from qcore import hookimpl
from qcore.data import tokenize
from qcore.interfaces import DataSpec, Evaluator, Quantizer
from qcore.quant.linear import QuantLinear
from qcore.reports import EvaluationResult


class ClippedRTNConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    clip_ratio: float = Field(default=0.9, gt=0, le=1)


class ClippedRTN(Quantizer):
    name = "clipped-rtn"
    Config = ClippedRTNConfig
    description = "RTN with a fixed shrink of every weight range (example plugin)"

    def quantize_layer(self, ctx):
        args = self.scheme.weights.model_copy(update={"clip_ratio": self.config.clip_ratio})
        for name in ctx.adapter.linear_names():
            ctx.replace(name, QuantLinear.from_float(ctx.submodule(name), args,
                                                     activations=self.scheme.activations))
        return {"clip_ratio": self.config.clip_ratio}


class TokenAccuracyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataSpec
    seq_len: int = Field(default=512, gt=1)
    windows: int | None = Field(default=8, gt=0)
    batch_size: int = 4
    stride: int | None = None
    progress: bool = False


class TokenAccuracy(Evaluator):
    name = "token-accuracy"
    Config = TokenAccuracyConfig
    description = "top-1 next-token accuracy on the first N windows (example plugin)"

    @torch.no_grad()
    def evaluate(self, model, tokenizer, backend, texts):
        cfg = self.config
        ids = tokenize(tokenizer, texts.text(cfg.data))
        n = min(cfg.windows or ids.numel() // cfg.seq_len, ids.numel() // cfg.seq_len)
        windows = ids[: n * cfg.seq_len].reshape(n, cfg.seq_len).to(backend.device)
        correct = 0
        for start in range(0, n, cfg.batch_size):
            batch = windows[start:start + cfg.batch_size]
            pred = model(input_ids=batch, use_cache=False).logits[:, :-1].argmax(-1)
            correct += int((pred == batch[:, 1:]).sum())
        total = n * (cfg.seq_len - 1)
        return EvaluationResult(evaluator=self.name,
                                metrics={"accuracy": correct / total, "tokens": float(total)})


@hookimpl
def qcore_register_quantizers(register):
    register(ClippedRTN)


@hookimpl
def qcore_register_evaluators(register):
    register(TokenAccuracy)


@hookimpl
def qcore_layer_quantized(report):
    path = os.environ.get("QCORE_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(report.model_dump()) + "\n")
