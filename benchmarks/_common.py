"""Helpers every method benchmark shares, on both sides (qcore's venv and the peer's).

Imports nothing from qcore: the peer's side runs in llm-compressor's own environment."""

from __future__ import annotations

import math


def window_perplexity(model, eval_ids, batch_size: int = 4) -> float:
    """exp(mean next-token NLL) over the windows (rows of eval_ids), every position after
    the first scored; the same function scores both sides of a comparison."""
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, eval_ids.shape[0], batch_size):
            batch = eval_ids[start: start + batch_size]
            logits = model(input_ids=batch, use_cache=False).logits.float()
            nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                         batch[:, 1:].reshape(-1), reduction="sum"))
            count += batch[:, 1:].numel()
    return math.exp(nll / count)


def load_fp32(folder: str):
    """A plain HF folder as a float32 causal LM in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
