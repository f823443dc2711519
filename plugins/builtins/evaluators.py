"""Perplexity on non-overlapping (or strided) windows of a tokenized text.

The head runs on chunks of ``logit_chunk`` positions of the decoder's last hidden states,
so the float32 logits held at once are ``logit_chunk x vocabulary`` instead of a whole
batch's (4 x 512 x 151936 x 4 B = 1.2 GB for a Qwen2 vocabulary, and its log-softmax).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from qcore.console import Steps
from qcore.data import tokenize
from qcore.hookspecs import hookimpl
from qcore.interfaces import Backend, DataSpec, EvaluationResources, Evaluator
from qcore.reports import EvaluationResult


class PerplexityConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    data: DataSpec
    seq_len: int = Field(default=512, gt=1)
    windows: int | None = Field(default=None, gt=0, description="first N windows; None = all")
    stride: int | None = Field(default=None, gt=0, description="window step; default seq_len")
    batch_size: int = Field(default=4, gt=0)
    logit_chunk: int = Field(default=256, gt=0, description="positions whose logits are "
                                                            "computed at once")
    progress: bool | None = Field(default=None, description="a live bar with the time left "
                                  "(None: on a terminal only; True: a line per batch elsewhere)")


def window_plan(n_tokens: int, seq_len: int, stride: int, windows: int | None
                ) -> list[tuple[int, int, int]]:
    """(start, end, scored) per window. With stride < seq_len only the tokens not scored by
    the previous window count (the sliding-window evaluation of the transformers docs)."""
    plan = []
    prev_end = 0
    for start in range(0, n_tokens - seq_len + 1, stride):
        end = start + seq_len
        scored = seq_len - 1 if not plan else min(end - prev_end, seq_len - 1)
        plan.append((start, end, scored))
        prev_end = end
        if windows is not None and len(plan) == windows:
            break
    return plan


def chunked_nll(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, chunk: int
                ) -> float:
    """Summed next-token NLL of ``targets`` given the decoder's ``hidden`` states (one row
    per position), the head applied ``chunk`` positions at a time in float32."""
    total = 0.0
    for start in range(0, hidden.shape[0], chunk):
        logits = head(hidden[start: start + chunk]).float()
        total += float(F.cross_entropy(logits, targets[start: start + chunk], reduction="sum"))
    return total


class Perplexity(Evaluator):
    name = "perplexity"
    Config = PerplexityConfig
    description = "exp(mean token NLL) over the first N windows of L tokens"
    summary_metrics = ("perplexity",)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, tokenizer: Any, backend: Backend,
                 texts: EvaluationResources
                 ) -> EvaluationResult:
        cfg: PerplexityConfig = self.config
        ids = tokenize(tokenizer, texts.text(cfg.data))
        stride = cfg.stride or cfg.seq_len
        plan = window_plan(ids.numel(), cfg.seq_len, stride, cfg.windows)
        if not plan:
            raise ValueError(f"text has {ids.numel()} tokens, fewer than seq_len={cfg.seq_len}")
        if cfg.windows is not None and len(plan) < cfg.windows:
            raise ValueError(f"windows={cfg.windows} asked but the text gives only {len(plan)} "
                             f"windows of {cfg.seq_len} tokens")
        model.eval()
        model = texts.place(model, backend)  # over several devices when it has them
        nll, scored = 0.0, 0
        with Steps("perplexity windows", len(plan), cfg.progress) as steps:
            for b in range(0, len(plan), cfg.batch_size):
                chunk = plan[b: b + cfg.batch_size]
                batch = torch.stack([ids[s:e] for s, e, _ in chunk]).to(backend.device)
                hidden = model.get_decoder()(input_ids=batch, use_cache=False)[0]
                for row, (_, _, n) in enumerate(chunk):
                    nll += chunked_nll(model.get_output_embeddings(), hidden[row, -n - 1: -1],
                                       batch[row, -n:], cfg.logit_chunk)
                    scored += n
                steps.advance(len(chunk), info=f"perplexity {math.exp(nll / scored):.3f} so far")
        return EvaluationResult(
            evaluator=self.name,
            metrics={"perplexity": math.exp(nll / scored), "nll": nll / scored,
                     "tokens_scored": float(scored), "windows": float(len(plan))},
            details={"seq_len": cfg.seq_len, "stride": stride, "data": cfg.data.model_dump()},
        )


@hookimpl
def qcore_register_evaluators(register):
    register(Perplexity)
