"""The GPTQ quantizer: true-sequential Hessian collection per decoder layer, then GPTQ per
linear (see :mod:`qcore.quant.gptq` for the solver).

Inside a decoder layer the linears are processed in the adapter's sequential groups (for
Llama: k/v/q, then o, then up/gate, then down). A group's Hessians are collected from a
forward pass in which every earlier group is already quantized; the pass stops as soon as
the group's inputs have been seen, and linears fed the very same input tensor (q/k/v,
gate/up) share one Hessian. When two consecutive groups live in one submodule (gate/up and
down inside ``mlp``) that submodule's inputs are kept from the first pass and the second
pass runs only the submodule.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field
from torch import nn

from qcore.interfaces import LayerNameList, Quantizer, UnsupportedScheme
from qcore.models.adapter import LayerRoles
from qcore.pipeline import LayerContext
from qcore.quant.gptq import (
    HessianAccumulator,
    HessianFactor,
    factor_hessian,
    gptq_quantize,
    objective,
)
from qcore.quant.linear import QuantLinear, SolvedWeight
from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import QuantScheme
from qcore_gptq.solver import GPTQSolverConfig


class GPTQConfig(GPTQSolverConfig):
    """Options of ``qcore quantize --method gptq`` (``--set key=value``): the solver's
    options plus the layer-level ones."""

    true_sequential: bool = Field(
        default=True,
        description="collect each sequential group's Hessians with the earlier groups of the "
                    "layer already quantized; false: one pass with the whole layer in float")
    skip: LayerNameList = Field(
        default_factory=list,
        description="linear names (relative to a decoder layer) left in full precision")


def _common_parent(names: list[str]) -> str:
    """The deepest module name that contains every name ('' = the decoder layer)."""
    parts = [n.split(".")[:-1] for n in names]
    common: list[str] = []
    for level in zip(*parts, strict=False):
        if all(p == level[0] for p in level):
            common.append(level[0])
        else:
            break
    return ".".join(common)


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


class _Stop(Exception):
    pass


class _Stage:
    """One forward pass collecting the Hessians (and input ranges) of one group."""

    def __init__(self, ctx: LayerContext, members: list[str], track_absmax: bool,
                 keep: str | None = None) -> None:
        self.ctx = ctx
        self.members = members
        self.track_absmax = track_absmax
        self.keep = keep  # a member whose input is kept per batch in self.kept
        self.kept: list[torch.Tensor] = []
        self.hessians: dict[str, HessianAccumulator] = {}
        self.absmax: dict[str, torch.Tensor] = {}
        self.alias: dict[str, str] = {}  # member -> member whose input it shares

    def run(self, entry: str, entry_inputs: list[tuple[tuple, dict]] | None,
            capture: str | None) -> list[tuple[tuple, dict]]:
        """Run every batch through ``entry`` ('' = the layer with the cached inputs, else a
        submodule with ``entry_inputs``); return the inputs ``capture`` saw per batch."""
        ctx = self.ctx
        layer = ctx.layer
        captured: list[tuple[tuple, dict]] = []
        state: dict[str, Any] = {"batch": 0, "seen": {}, "need": set(self.members)}

        def pre_hook(module: nn.Module, margs: tuple, _n: str) -> None:
            x = margs[0]
            if _n == self.keep:
                self.kept.append(x)
            seen: dict[str, torch.Tensor] = state["seen"]
            if state["batch"] == 0:
                source = next((m for m, t in seen.items() if t is x and m not in self.alias),
                              None)
                if source is not None:
                    self.alias[_n] = source
                else:
                    self._observe(_n, x)
            elif _n in self.alias:
                if seen.get(self.alias[_n]) is not x:
                    raise RuntimeError(
                        f"{ctx.name}.{_n}: its input stopped being the same tensor as "
                        f"{self.alias[_n]}'s after the first batch")
            else:
                self._observe(_n, x)
            seen[_n] = x
            if state["need"] <= seen.keys():
                raise _Stop

        def capture_hook(_module: nn.Module, margs: tuple, mkwargs: dict) -> None:
            captured.append((margs, dict(mkwargs)))

        handles = [layer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, _n=n: pre_hook(m, a, _n)) for n in self.members]
        if capture is not None:
            handles.append(layer.get_submodule(capture).register_forward_pre_hook(
                capture_hook, with_kwargs=True))
        try:
            if entry == "":
                batches = [((x,), kw) for x, kw in zip(ctx.inputs, ctx.kwargs, strict=True)]
                module = layer
            else:
                assert entry_inputs is not None
                batches = entry_inputs
                module = layer.get_submodule(entry)
            with torch.no_grad():
                for b, (margs, mkwargs) in enumerate(batches):
                    state["batch"] = b
                    state["seen"] = {}
                    if b == 1:  # members sharing an input need not be waited for
                        state["need"] = set(self.members) - set(self.alias)
                    try:
                        module(*margs, **mkwargs)
                    except _Stop:
                        pass
        finally:
            for h in handles:
                h.remove()
        missing = [m for m in self.members if m not in self.hessians and m not in self.alias]
        if missing:
            raise RuntimeError(f"{ctx.name}: {', '.join(missing)} never ran in the layer's "
                               "forward pass; cannot collect its Hessian")
        return captured

    def _observe(self, name: str, x: torch.Tensor) -> None:
        acc = self.hessians.get(name)
        if acc is None:
            acc = self.hessians[name] = HessianAccumulator(x.shape[-1], device=x.device)
        acc.add(x)
        if self.track_absmax:
            cur = x.detach().abs().reshape(-1, x.shape[-1]).amax(dim=0).float()
            prev = self.absmax.get(name)
            self.absmax[name] = cur if prev is None else torch.maximum(prev, cur)

    def hessian(self, name: str) -> HessianAccumulator:
        return self.hessians[self.alias.get(name, name)]

    def input_absmax(self, name: str) -> torch.Tensor:
        return self.absmax[self.alias.get(name, name)]


class GPTQQuantizer(Quantizer):
    name = "gptq"
    Config = GPTQConfig
    description = "GPTQ: Hessian-based error-feedback weight quantization (Frantar et al.)"
    propagation = "quantized"

    config: GPTQConfig

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.kv_cache is not None:
            raise UnsupportedScheme(
                f"gptq quantizes weights (and activations like rtn), not the KV cache "
                f"(scheme {scheme.name}); use smoothquant or flatquant for KV quantization")
        if scheme.weights.granularity not in ("channel", "group"):
            raise UnsupportedScheme(
                f"gptq needs per-channel or per-group weights, not weights.granularity="
                f"{scheme.weights.granularity!r} (scheme {scheme.name})")

    def _groups(self, ctx: LayerContext) -> list[list[str]]:
        skip = set(self.config.skip)
        groups = [[n for n in g if n not in skip] for g in ctx.adapter.sequential_groups()]
        groups = [g for g in groups if g]
        if not self.config.true_sequential:
            groups = [[n for g in groups for n in g]] if groups else []
        return groups

    @torch.no_grad()
    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        cfg = self.config
        act = self.scheme.activations
        static_act = act is not None and not act.dynamic
        mse = cfg.clip()
        groups = self._groups(ctx)
        roles = ctx.adapter.roles()
        stats: dict[str, Any] = {}
        entry, entry_inputs = "", None
        o_inputs: list[torch.Tensor | None] | None = None
        hessian_seconds = 0.0
        total_loss = 0.0
        total_rtn = 0.0
        for k, group in enumerate(groups):
            for name in group:
                if not isinstance(ctx.submodule(name), nn.Linear):
                    raise TypeError(f"{ctx.name}.{name} is {type(ctx.submodule(name)).__name__},"
                                    " not nn.Linear")
            capture = None
            if k + 1 < len(groups):
                parent = _common_parent(group + groups[k + 1])
                if parent and _inside(parent, entry):
                    capture = parent
            t0 = time.perf_counter()
            if o_inputs is not None and capture == _mlp_of(roles):
                rebuilt = _mlp_inputs_from_o(ctx, o_inputs)
                if rebuilt is not None:
                    entry, entry_inputs = capture, rebuilt
                del rebuilt
            o_inputs = None
            keep = None
            if k + 1 < len(groups) and _mlp_of(roles) and group == [roles.o]:
                keep = roles.o
            stage = _Stage(ctx, group, static_act, keep=keep)
            captured = stage.run(entry, entry_inputs, capture)
            entry_inputs = None  # let the previous pass's activations go
            if keep is not None and len(stage.kept) == len(ctx.inputs):
                o_inputs, stage.kept = stage.kept, []
            hessian_seconds += time.perf_counter() - t0
            entry, entry_inputs = (capture, captured) if capture else ("", None)
            del captured
            factors: dict[int, HessianFactor] = {}  # one per shared Hessian
            for name in group:
                t1 = time.perf_counter()
                linear = ctx.submodule(name)
                acc = stage.hessian(name)
                if id(acc) not in factors:
                    # the passes' freed activations fragment the heap; hand them back
                    # before the columns x columns temporaries (three of 321 MB at 8960)
                    ctx.backend.empty_cache()
                    factors[id(acc)] = factor_hessian(
                        acc.H, act_order=cfg.act_order, damp=cfg.damp, damp_step=cfg.damp_step,
                        damp_max_steps=cfg.damp_max_steps, cholesky=ctx.backend.cholesky,
                        cholesky_inverse=ctx.backend.cholesky_inverse,
                        name=f"{ctx.name}.{name}")
                result = gptq_quantize(
                    linear.weight, acc.H, self.scheme.weights, block_size=cfg.block_size,
                    act_order=cfg.act_order, static_groups=cfg.static_groups, mse=mse,
                    factor=factors[id(acc)], name=f"{ctx.name}.{name}")
                rtn = objective(linear.weight,
                                fake_quantize_weight(linear.weight.float(), self.scheme.weights),
                                acc.H)
                q = QuantLinear.from_solved(
                    linear, SolvedWeight(result.Q, result.scale, result.zero, result.g_idx),
                    self.scheme.weights, activations=self.scheme.activations)
                if static_act:
                    m = stage.input_absmax(name).max()
                    stats[f"{name}.input_scale"] = q.set_input_range(-m, m)
                ctx.replace(name, q)
                total_loss += result.loss
                total_rtn += rtn
                stats[f"{name}.loss"] = result.loss
                stats[f"{name}.rtn_loss"] = rtn
                stats[f"{name}.damp"] = result.damp
                if result.damp_raises:
                    stats[f"{name}.damp_raises"] = result.damp_raises
                if result.dead:
                    stats[f"{name}.dead_inputs"] = result.dead
                stats[f"{name}.seconds"] = time.perf_counter() - t1
                ctx.log.debug("%s.%s: GPTQ loss %.4g (RTN %.4g), damp %.4g, %d tokens",
                              ctx.name, name, result.loss, rtn, result.damp, acc.tokens)
            del stage, factors
        ctx.backend.empty_cache()  # the solver's temporaries fragment the heap
        stats["loss"] = total_loss
        stats["rtn_loss"] = total_rtn
        stats["hessian_seconds"] = hessian_seconds
        return stats


def _mlp_of(roles: LayerRoles) -> str | None:
    """The MLP block when the layer is pre-norm residual with known o/MLP-norm roles (its
    MLP inputs can be rebuilt from the o_proj inputs), else None."""
    if roles.pre_norm_residual and not roles.missing(("mlp", "o", "mlp_norm")):
        return roles.mlp
    return None


def _mlp_inputs_from_o(ctx: LayerContext, o_inputs: list[torch.Tensor | None]
                       ) -> list[tuple[tuple, dict]] | None:
    """The MLP's inputs of a pre-norm residual layer, ``norm2(x + o_proj(o_in))``, from the
    o_proj inputs kept by the previous pass: the gate/up pass then skips q/k/v and the
    attention. Checked against the real layer on the first batch; None (run the layer)
    when the layer computes something else."""
    roles = ctx.adapter.roles()
    o_proj, norm = ctx.submodule(roles.o), ctx.submodule(roles.mlp_norm)
    real: list[torch.Tensor] = []

    def stop(_module: nn.Module, margs: tuple) -> None:
        real.append(margs[0])
        raise _Stop

    handle = ctx.submodule(roles.mlp).register_forward_pre_hook(stop)
    try:
        ctx.layer(ctx.inputs[0], **ctx.kwargs[0])
    except _Stop:
        pass
    finally:
        handle.remove()
    if not real or not torch.allclose(norm(ctx.inputs[0] + o_proj(o_inputs[0])), real[0],
                                      rtol=1e-5, atol=1e-6):
        ctx.log.debug("%s: the MLP input is not norm2(x + o_proj(o_in)); running the layer",
                      ctx.name)
        return None
    rebuilt = [((real[0],), {})]
    o_inputs[0] = None  # consumed as we go: one extra activation buffer, not two
    for b in range(1, len(o_inputs)):
        rebuilt.append(((norm(ctx.inputs[b] + o_proj(o_inputs[b])),), {}))
        o_inputs[b] = None
    return rebuilt
