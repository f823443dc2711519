"""Batched sampling generation on any qcore model (float or quantized, any saved scheme).

Prompts are left-padded into batches and handed to transformers' ``generate`` (attention
mask and KV cache included), so every path a model has — QuantLinear reference or int8
kernels, online transforms, the ``qcore_kv`` attention with its quantized KV cache — runs
exactly as in evaluation. A seed makes a run reproducible: each batch draws from a
generator seeded by ``(seed, key of the batch's first item)``, so the same model, seed,
batch size and prompts give the same text, also when a run resumes after an interruption
(whole batches are written, so it resumes at a batch boundary).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from qcore.quant.linear import cached_dequantization

log = logging.getLogger(__name__)


class SamplingConfig(BaseModel):
    """How to sample (the study's defaults: temperature 0.6, top_p 0.95)."""

    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(default=0.6, ge=0.0, description="0: greedy decoding")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="nucleus sampling mass")
    top_k: int | None = Field(default=None, gt=0, description="sample among the k likeliest")
    max_new_tokens: int = Field(default=32768, gt=0, description="generation budget per item")
    stop: list[str] = Field(default_factory=list, description="stop strings")
    batch_size: int = Field(default=8, gt=0, description="prompts per generate call")
    cache_dequantized: bool = Field(
        default=True, description="keep each QuantLinear's dequantized weight for the whole "
        "generation (reference path; costs a float copy of the quantized weights) instead "
        "of dequantizing at every decoding step")


@dataclass
class Generation:
    text: str
    tokens: list[int]
    finish_reason: Literal["stop", "length"]


def format_prompt(tokenizer: Any, content: str) -> str:
    """The chat template's user turn when the tokenizer has one, else ``content`` as is."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                             tokenize=False, add_generation_prompt=True)
    return content


def _seed(seed: int, first: int) -> int:
    return (seed * 1_000_003 + first) % (2**63 - 1)


class _Pace(LogitsProcessor):
    """Reports the decoding speed (tokens/s over the batch's rows) once, after ``steps``
    decoding steps; passes the scores through untouched."""

    def __init__(self, rows: int, report: Callable[[float], None], steps: int = 4) -> None:
        self.rows, self.report, self.steps = rows, report, steps
        self.calls, self.started = 0, 0.0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:  # the prompt's logits: decoding starts now
            self.started = time.perf_counter()
        elif self.calls == self.steps + 1 and self.report is not None:
            self.report(self.rows * self.steps / (time.perf_counter() - self.started))
            self.report = None
        return scores


@dataclass
class Watch:
    """What a caller of :func:`generate` hears while it runs."""

    #: after each batch: (index of its first prompt, its generations)
    batch: Callable[[int, list[Generation]], None] | None = None
    #: once, a few decoding steps into the first batch: tokens per second over the batch
    #: (for an estimate of the whole run before its first batch ends)
    speed: Callable[[float], None] | None = None


@torch.no_grad()
def generate(model: nn.Module, tokenizer: Any, prompts: list[str], cfg: SamplingConfig,
             seed: int, device: torch.device | str = "cpu", keys: list[int] | None = None,
             watch: Watch | None = None) -> tuple[list[Generation], dict[str, float]]:
    """Generate for every prompt, telling ``watch`` after each batch and once the first
    batch's pace is known. A batch samples from a generator seeded by ``seed`` and the key
    of its first prompt (``keys``, default the position), so a run resumed at a batch
    boundary with the same keys reproduces the uninterrupted one. Returns the generations
    and throughput."""
    eos = tokenizer.eos_token_id
    borrowed = tokenizer.pad_token is None  # pad with eos (masked out) for this call only
    if borrowed:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    pad = tokenizer.pad_token_id
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    out: list[Generation] = []
    generated = 0
    started = time.perf_counter()
    cache = cached_dequantization() if cfg.cache_dequantized else contextlib.nullcontext()
    with cache:
        try:
            for start in range(0, len(prompts), cfg.batch_size):
                batch = prompts[start:start + cfg.batch_size]
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False)
                ids = enc.input_ids.to(device)
                mask = enc.attention_mask.to(device)
                torch.manual_seed(_seed(seed, keys[start] if keys is not None else start))
                kwargs: dict[str, Any] = dict(
                    max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                    do_sample=cfg.temperature > 0)
                if cfg.temperature > 0:
                    kwargs.update(temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k or 0)
                if cfg.stop:
                    kwargs.update(stop_strings=cfg.stop, tokenizer=tokenizer)
                if watch is not None and watch.speed is not None and start == 0:
                    kwargs["logits_processor"] = LogitsProcessorList([_Pace(len(batch),
                                                                            watch.speed)])
                seqs = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
                gens = [_finish(row[ids.shape[1]:].tolist(), tokenizer, pad, eos, cfg)
                        for row in seqs]
                generated += sum(len(g.tokens) for g in gens)
                out.extend(gens)
                if watch is not None and watch.batch is not None:
                    watch.batch(start, gens)
        finally:
            tokenizer.padding_side = side
            if borrowed:
                tokenizer.pad_token = None
    seconds = time.perf_counter() - started
    return out, {"generated_tokens": float(generated), "generation_seconds": seconds,
                 "tokens_per_second": generated / max(seconds, 1e-9)}


def _finish(new: list[int], tokenizer: Any, pad: int, eos: int | None,
            cfg: SamplingConfig) -> Generation:
    """Cut the padding after the end of a row; say why it ended."""
    tokens = list(new)
    ended = False
    if eos is not None and eos in tokens:
        tokens = tokens[:tokens.index(eos)]
        ended = True
    elif pad != eos:
        while tokens and tokens[-1] == pad:
            tokens.pop()
            ended = True
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    for stop in cfg.stop:
        if stop in text:
            text = text[:text.index(stop)]
            ended = True
    if not ended and len(new) < cfg.max_new_tokens:
        ended = True  # generate stopped early (e.g. every row of the batch finished)
    return Generation(text=text, tokens=tokens, finish_reason="stop" if ended else "length")
