"""Hooks of the example plugin; only qcore's public API is used."""

from __future__ import annotations

import json
import os

import torch
from pydantic import BaseModel, ConfigDict, Field

from qcore import hookimpl
from qcore.data import tokenize
from qcore.interfaces import DataSpec, Evaluator, Quantizer, WeightSolver
from qcore.models.adapter import LayerRoles, LlamaLikeAdapter
from qcore.quant.linear import QuantLinear, SolvedWeight
from qcore.quant.qparams import weight_qparams
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


class ClippedRTNSolver(WeightSolver):
    """The same rounding as a weight solver, so that methods which transform weights first
    compose with it: ``--method smoothquant --set weight_method=clipped-rtn``."""

    name = "clipped-rtn"
    Config = ClippedRTNConfig
    description = "RTN of a shrunk weight range, as a composable solver (example plugin)"

    def solve(self, weight, args, hessian, backend, name):
        args = args.model_copy(update={"clip_ratio": self.config.clip_ratio})
        scale, zero = weight_qparams(weight.detach(), args)
        return SolvedWeight(weight=weight.detach(), scale=scale, zero=zero,
                            stats={"clip_ratio": self.config.clip_ratio})


class GraniteAdapter(LlamaLikeAdapter):
    """IBM Granite: the Llama layout, but each residual branch is scaled
    (``h = x + m * attn(norm1(x))``), so the layer is not a plain pre-norm residual one.
    Saying so in the roles keeps methods from assuming it (GPTQ's MLP-input shortcut)."""

    name = "granite"
    model_types = ("granite",)
    description = "IBM Granite decoders (scaled residual branches; example plugin)"

    def roles(self) -> LayerRoles:
        return super().roles().model_copy(update={"pre_norm_residual": False})


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
def qcore_register_solvers(register):
    register(ClippedRTNSolver)


@hookimpl
def qcore_register_architectures(register):
    register(GraniteAdapter)


@hookimpl
def qcore_register_evaluators(register):
    register(TokenAccuracy)


def token_count(args) -> int:
    """``qcore token-count``: how many tokens a text is for a model's tokenizer."""
    from qcore import api

    _, tokenizer, _ = api.load_model(args.model)
    text = api.datasets().text(DataSpec(source=args.data, part=args.part))
    n = tokenize(tokenizer, text).numel()
    print(json.dumps({"data": args.data, "part": args.part, "tokens": n,
                      "windows_of_512": n // 512}))
    return 0


@hookimpl
def qcore_register_commands(subparsers):
    p = subparsers.add_parser("token-count", help="tokens of a text for a model's tokenizer "
                                                  "(example plugin)")
    p.add_argument("--model", required=True, help="model whose tokenizer counts")
    p.add_argument("--data", default="pydoc", help="text source (default: pydoc)")
    p.add_argument("--part", default="all", choices=["all", "head", "tail"],
                   help="which half of the text (default: all)")
    p.set_defaults(func=token_count)


def flag_jumps(errors: list[float], k: float = 3.0) -> list[int]:
    """Layers whose error is above ``k`` times the median of their neighbours' (the layers
    right before and after): where a platform or a scheme breaks, layer by layer."""
    flagged = []
    for i, err in enumerate(errors):
        around = sorted(errors[j] for j in (i - 1, i + 1) if 0 <= j < len(errors))
        if around and err > k * around[len(around) // 2]:
            flagged.append(i)
    return flagged


def _log(record: dict) -> None:
    path = os.environ.get("QCORE_EXAMPLE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


_errors: list[float] = []  # this run's layer errors, in layer order


@hookimpl
def qcore_layer_quantized(report):
    """A custom evaluator hook: log every layer report as it arrives."""
    _errors.append(report.relative_mse)
    _log(report.model_dump())


@hookimpl
def qcore_model_quantized(report, model):
    """All layers done: flag the jumps of the quantization error curve."""
    _log({"event": "model_quantized", "method": report.method,
          "jumps": flag_jumps([x.relative_mse for x in report.layers])})
    _errors.clear()


@hookimpl
def qcore_evaluation_finished(result):
    """After ``qcore evaluate --evaluator layer-error``: flag jumps of the per-layer error
    of the quantized layers judged alone (the study's layer-wise instability)."""
    if result.evaluator == "layer-error":
        for backend, rows in result.details["curves"].items():
            _log({"event": "layer_error", "backend": backend,
                  "jumps": flag_jumps([r["alone"] for r in rows])})
