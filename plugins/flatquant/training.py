"""Training one decoder layer's FlatQuant learnables (the reference's ``train_utils.py``).

While a layer trains, its linears are stood in for by wrappers that apply the transforms
and fake-quantize both sides with straight-through gradients (and its attention gets a
training KV-cache module); the learnables then minimise the MSE between the fake-quantized
layer's output and the full-precision layer's, with AdamW and a cosine schedule.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qcore.context import LayerContext
from qcore.errors import NonFiniteError
from qcore.quant.kvcache import fake_quantize_heads
from qcore.quant.linear import replace_module
from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import QuantArgs, QuantScheme
from qcore_flatquant.config import FlatQuantConfig
from qcore_flatquant.learnables import LayerTransforms, fake_quant_tokens_ste


# ----------------------------------------------------------------------------- training modules
class _TrainLinear(nn.Module):
    """Stands in for a linear during training: transform + fake quant (STE) of both sides."""

    def __init__(self, owner: LayerTransforms, name: str, linear: nn.Linear,
                 scheme: QuantScheme | None) -> None:
        super().__init__()
        self.linear = linear
        self.name = name
        self.role = owner.role[name]
        self.scheme = scheme
        object.__setattr__(self, "owner", owner)  # not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        owner: LayerTransforms = self.owner  # type: ignore[assignment]
        m = owner.cached_mats()
        dtype = x.dtype
        x = owner.shared_input(self.role, x, m)
        w = self.linear.weight.detach().float()
        b = None if self.linear.bias is None else self.linear.bias.detach().float()
        quant = self.scheme is not None
        w, b = owner.transform_weight(self.role, self.name, w, b, m, clip=quant)
        if quant:
            w = owner.call(fake_quantize_weight, w, self.scheme.weights, ste=True)
            act = self.scheme.activations
            if act is not None:
                cmin, cmax = owner.act_clip(self.name)
                x = owner.call(fake_quant_tokens_ste, x, act, cmin, cmax,
                               clamp=owner.variant.clamp_tokens)
        return F.linear(x, w, b).to(dtype)


class _TrainKV(nn.Module):
    """Training-time ``qcore_kv`` module: key transform and STE fake quantization."""

    def __init__(self, owner: LayerTransforms, kv: QuantArgs | None) -> None:
        super().__init__()
        self.kv = kv
        object.__setattr__(self, "owner", owner)

    def forward(self, query, key, value):
        owner: LayerTransforms = self.owner  # type: ignore[assignment]
        if owner.k is not None:
            dtype = key.dtype
            m = owner.cached_mats()
            pk, pk_it = m["k"], m["k_it"]
            query = torch.matmul(query.float(), pk_it).to(dtype)
            key = torch.matmul(key.float(), pk).to(dtype)
        if self.kv is not None:
            key = fake_quantize_heads(key.float(), self.kv, ste=True).to(key.dtype)
            value = fake_quantize_heads(value.float(), self.kv, ste=True).to(value.dtype)
        return query, key, value


@contextmanager
def training_layer(layer: nn.Module, owner: LayerTransforms, attn_name: str,
                   scheme: QuantScheme | None) -> Iterator[nn.Module]:
    """Swap the layer's linears for training wrappers (and attach the training KV module);
    ``scheme=None`` runs the transforms with every quantizer and clip off."""
    originals = {}
    for name in owner.names.values():
        linear = layer.get_submodule(name)
        originals[name] = replace_module(layer, name, _TrainLinear(owner, name, linear, scheme))
    attn = layer.get_submodule(attn_name)
    old_kv = getattr(attn, "qcore_kv", None)
    kv_args = scheme.kv_cache if scheme is not None else None
    attn.qcore_kv = _TrainKV(owner, kv_args)
    hook = layer.register_forward_pre_hook(owner.clear_cache)
    try:
        yield layer
    finally:
        hook.remove()
        owner.clear_cache()
        for name, linear in originals.items():
            replace_module(layer, name, linear)
        if old_kv is None:
            del attn.qcore_kv
        else:
            attn.qcore_kv = old_kv


# ----------------------------------------------------------------------------- batching
def _shared_kwargs(kwargs: list[dict[str, Any]], batch: int) -> dict[str, Any]:
    """One set of layer keyword arguments valid for any batch size: tensors whose first dim
    is the calibration batch must be identical across it (no padding) and are cut to 1."""

    def squeeze(key: str, v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[0] == batch and batch > 1:
            if not torch.equal(v, v[:1].expand_as(v)):
                raise ValueError(f"flatquant: layer argument {key!r} differs across the "
                                 "calibration batch (padded windows?); cannot re-batch")
            return v[:1]
        if isinstance(v, tuple):
            return tuple(squeeze(key, x) for x in v)
        if isinstance(v, list):
            return [squeeze(key, x) for x in v]
        return v

    return {k: squeeze(k, v) for k, v in kwargs[0].items()}


def _out(y: Any) -> torch.Tensor:
    return y[0] if isinstance(y, (tuple, list)) else y


def _diverged(layer: str, epoch: int, step: int, loss: float, lr: float, start: float
              ) -> str:
    """The message for a training step whose loss is NaN/inf, with the likely cause."""
    where = f"flatquant: {layer}, epoch {epoch}, step {step}: training loss is {loss}"
    if start != start or start == float("inf"):
        return (f"{where}, and was already non-finite before training: the layer's inputs "
                "or its float targets hold NaN/inf")
    return (f"{where} (started at {start:.3e}): the optimisation diverged; lower lr "
            f"(now {lr:g}) or the clip learning-rate multiplier")


# ----------------------------------------------------------------------------- train loop
class _Batches:
    """A layer's calibration batches (inputs and float targets) and its forward on them."""

    def __init__(self, ctx: LayerContext, batch_size: int, amp: bool) -> None:
        inputs = torch.cat(list(ctx.inputs))
        targets = torch.cat(list(ctx.fp_outputs))
        self.kw = _shared_kwargs(ctx.kwargs, ctx.batch_shapes()[0][0])
        n = inputs.shape[0]
        bs = min(batch_size, n)
        self.steps_per_epoch = n // bs
        self.batches = [(inputs[i * bs:(i + 1) * bs], targets[i * bs:(i + 1) * bs])
                        for i in range(self.steps_per_epoch)]
        self.layer = ctx.layer
        self.device_type = ctx.device.type
        self.amp = amp

    def autocast(self) -> torch.autocast:
        return torch.autocast(device_type=self.device_type, dtype=torch.bfloat16,
                              enabled=self.amp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _out(self.layer(x, **self.kw))

    def evaluate(self) -> tuple[float, float]:
        """(mean MSE, relative MSE) of the training-time (fake-quantized) layer."""
        total, err, ref = 0.0, 0.0, 0.0
        with torch.no_grad(), self.autocast():
            for x, y in self.batches:
                diff = self.forward(x).float() - y.float()
                total += float(diff.pow(2).mean())
                err += float(diff.pow(2).sum())
                ref += float(y.float().pow(2).sum())
        return total / len(self.batches), err / max(ref, 1e-30)


def _param_groups(owner: LayerTransforms, cfg: FlatQuantConfig, lac: bool
                  ) -> list[dict[str, Any]]:
    """AdamW's parameter groups (transforms and scales at lr, clipping factors at lr x the
    multiplier); only their parameters require grad afterwards."""
    trans = owner.transform_parameters() if cfg.train_transforms else []
    diag = [k.diag for k in (owner.ln, owner.up, owner.down) if k.diag is not None]
    trans = [p for p in trans if all(p is not d for d in diag)] + diag
    clips = owner.clip_parameters(cfg.lwc, cfg.lac and lac)
    for p in owner.parameters():
        p.requires_grad_(False)
    groups = []
    if trans:
        groups.append({"params": trans, "lr": cfg.lr})
    if clips:
        groups.append({"params": clips, "lr": cfg.lr * cfg.clip_lr_multiplier})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


def _optimise(data: _Batches, groups: list[dict[str, Any]], cfg: FlatQuantConfig,
              layer: str, loss_start: float) -> list[float]:
    """The epochs of AdamW with a cosine schedule; returns each epoch's mean loss."""
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    total = cfg.epochs * data.steps_per_epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=total, eta_min=cfg.lr * cfg.min_lr_ratio)
    epoch_losses: list[float] = []
    with torch.enable_grad():
        for epoch in range(cfg.epochs):
            acc = 0.0
            for step, (x, y) in enumerate(data.batches):
                with data.autocast():
                    out = data.forward(x)
                loss = F.mse_loss(out.float(), y.float())
                if not torch.isfinite(loss):
                    raise NonFiniteError(_diverged(layer, epoch, step, float(loss.detach()),
                                                   cfg.lr, loss_start))
                acc += float(loss.detach())
                objective = loss / loss.detach() if cfg.normalize_loss else loss
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                sched.step()
            epoch_losses.append(acc / data.steps_per_epoch)
    return epoch_losses


def train_layer(ctx: LayerContext, owner: LayerTransforms, scheme: QuantScheme,
                cfg: FlatQuantConfig) -> dict[str, Any]:
    """Train ``owner`` on the layer's calibration inputs against its float outputs
    (``ctx.fp_outputs``), quantizing to ``scheme``; returns the training statistics."""
    data = _Batches(ctx, cfg.batch_size, cfg.train_dtype == "bfloat16")
    attn = ctx.adapter.roles().attention
    for p in ctx.layer.parameters():
        p.requires_grad_(False)
    groups = _param_groups(owner, cfg, scheme.activations is not None)
    epoch_losses: list[float] = []
    t0 = time.perf_counter()
    with training_layer(ctx.layer, owner, attn, scheme):
        loss_start, rel_start = data.evaluate()
        t_steps = time.perf_counter()
        if groups and cfg.epochs > 0:
            epoch_losses = _optimise(data, groups, cfg, ctx.name, loss_start)
        t_steps = time.perf_counter() - t_steps
        loss_end, rel_end = data.evaluate()
    for p in owner.parameters():
        p.requires_grad_(False)
    steps = cfg.epochs * data.steps_per_epoch if groups else 0
    return {"loss_start": loss_start, "loss_end": loss_end,
            "loss_ratio": loss_end / max(loss_start, 1e-30),
            "train_relative_mse_start": rel_start, "train_relative_mse_end": rel_end,
            "epoch_losses": epoch_losses, "train_seconds": time.perf_counter() - t0,
            "steps": steps, "step_seconds": t_steps / steps if steps else 0.0}
