"""Each decoder layer's trained FlatQuant learnables on disk (the reference's
``--save_matrix`` / ``--reload_matrix``).

With ``matrices=DIR`` a layer's transforms, scales and clipping factors are written to
``DIR/<layer>.safetensors`` (atomically) as soon as the layer is trained, and a layer whose
file is already there is loaded instead of trained. Layers train independently (FlatQuant
propagates the float outputs, each layer's init is seeded by its index, the batches keep
their order), so a run that reloads layers 0..k-1 and trains the rest gives the model an
uninterrupted run gives: an interrupted calibration resumes at the first missing layer.

A file records what its training depended on: the scheme, every training option, the
layer's float weights and its calibration inputs (a fingerprint: shapes, sum of |x| and
sum of squares in float64). Reloading into a run that differs in any of them is refused, naming
the difference; options that only act after training (``weight_method``, ``fuse``) may
differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from qcore.errors import ConfigError
from qcore.io import atomic_write_bytes, dumps_json

FORMAT = "qcore-flatquant-matrices/1"
#: options that do not change what a layer learns (only how fast, or what happens after)
NOT_TRAINING = frozenset({"fuse", "matrices", "weight_method", "weight_options"})
#: relative tolerance of a fingerprint: the same activations computed with another thread
#: count differ by float rounding (sums of positive terms: ~1e-7 at most); another model or
#: calibration differs by far more
FINGERPRINT_RTOL = 1e-5


def matrix_file(folder: str | Path, layer: str) -> Path:
    return Path(folder) / f"{layer}.safetensors"


def fingerprint(tensors: Any) -> dict[str, Any]:
    """Shapes, sum of |x| and sum of squares (float64) over a sequence of tensors (positive
    sums: rounding noise stays relative to them)."""
    shapes, absolute, squares = [], 0.0, 0.0
    for t in tensors:
        shapes.append(list(t.shape))
        d = t.detach().double()
        absolute += float(d.abs().sum())
        squares += float(d.pow(2).sum())
    return {"shapes": shapes, "sum_abs": absolute, "sum_sq": squares}


def identity(scheme: Any, config: Any, layer: str, weights: dict[str, Any],
             inputs: dict[str, Any]) -> dict[str, Any]:
    """What a layer's training depended on, as JSON-able data."""
    training = {k: v for k, v in config.model_dump(mode="json").items() if k not in NOT_TRAINING}
    return {"format": FORMAT, "layer": layer, "scheme": scheme.model_dump(mode="json"),
            "training": training, "weights": weights, "inputs": inputs}


def save_matrices(path: Path, state: dict[str, torch.Tensor], ident: dict[str, Any],
                  stats: dict[str, Any]) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    meta = {"qcore_flatquant": dumps_json(ident), "stats": dumps_json(stats)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def _differences(saved: Any, now: Any, where: str) -> list[str]:
    """Where two identities differ (floats of a fingerprint within FINGERPRINT_RTOL)."""
    if isinstance(saved, dict) and isinstance(now, dict):
        out = []
        for k in sorted(set(saved) | set(now)):
            out += _differences(saved.get(k), now.get(k), f"{where}.{k}" if where else k)
        return out
    if isinstance(saved, float) and isinstance(now, float) and where.split(".")[0] in (
            "weights", "inputs"):
        close = math.isclose(saved, now, rel_tol=FINGERPRINT_RTOL, abs_tol=1e-30)
        return [] if close else [f"{where}: saved {saved!r}, now {now!r}"]
    return [] if saved == now else [f"{where}: saved {saved!r}, now {now!r}"]


def load_matrices(path: Path, ident: dict[str, Any]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The saved learnables and training statistics of one layer, after checking that
    ``ident`` (this run's) matches the file's."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as err:  # a truncated or foreign file
        raise ConfigError(f"flatquant matrices: cannot read {path}: {err}") from err
    if "qcore_flatquant" not in meta:
        raise ConfigError(f"flatquant matrices: {path} holds no qcore_flatquant metadata "
                          "(not written by qcore's flatquant)")
    saved = json.loads(meta["qcore_flatquant"])
    diff = _differences(saved, ident, "")
    if diff:
        shown = "; ".join(d if len(d) < 300 else d[:300] + "..." for d in diff[:4])
        more = f" (and {len(diff) - 4} more)" if len(diff) > 4 else ""
        raise ConfigError(
            f"flatquant matrices: {path} was trained for another run: {shown}{more}. "
            "Point matrices= at a new folder, or delete the file to train the layer again")
    return state, json.loads(meta.get("stats", "{}"))
