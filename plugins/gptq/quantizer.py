"""The GPTQ quantizer: true-sequential Hessian collection per decoder layer, then GPTQ per
linear (see :mod:`qcore_gptq.solve` for the solve; the Hessians are
:class:`qcore.quant.hessian.HessianAccumulator`).

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
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import Field
from torch import nn

from qcore.context import LayerContext
from qcore.interfaces import LayerNameList, Quantizer, UnsupportedScheme
from qcore.models.adapter import LayerRoles
from qcore.quant.hessian import HessianAccumulator
from qcore.quant.linear import QuantLinear, SolvedWeight
from qcore.quant.qparams import fake_quantize_weight
from qcore.schemes import QuantScheme
from qcore_gptq.solve import (
    GPTQOptions,
    GPTQResult,
    factor_hessian,
    gptq_quantize,
    objective,
)
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
    reuse_budget_mb: float = Field(
        default=1024.0, ge=0.0,
        description="MB of activations the passes may keep (down_proj's inputs and the "
                    "residual stream: tokens x (intermediate + hidden) x 4 bytes) to assemble "
                    "the quantized layer's outputs without running the layer again; when they "
                    "do not fit, the pipeline runs it (0: always)")


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
                # read a batch at a time: the inputs may be offloaded to disk
                batches = (((x,), kw) for x, kw in zip(ctx.inputs, ctx.kwargs, strict=True))
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


def _check_linears(ctx: LayerContext, group: list[str]) -> None:
    for name in group:
        if not isinstance(ctx.submodule(name), nn.Linear):
            raise TypeError(f"{ctx.name}.{name} is {type(ctx.submodule(name)).__name__},"
                            " not nn.Linear")


def _by_hessian(stage: _Stage, group: list[str]) -> list[list[str]]:
    """The group's linears by the Hessian they share (fed the same input tensor): one
    factorisation each, and their weights stacked row-wise go through one solve (GPTQ
    treats rows independently)."""
    shared: dict[int, list[str]] = {}
    for name in group:
        shared.setdefault(id(stage.hessian(name)), []).append(name)
    return list(shared.values())


@dataclass
class _Passes:
    """The Hessian passes of one decoder layer, one per sequential group, and what a pass
    hands the next: where it starts (``entry``: '' = the layer with its cached inputs, else
    a submodule with the ``entry_inputs`` the previous pass captured), o_proj's inputs to
    rebuild the MLP's inputs from, and the residual stream when the layer's outputs are
    assembled from the last pass's activations."""

    ctx: LayerContext
    roles: LayerRoles
    groups: list[list[str]]
    track_absmax: bool  # static activation scales: record the inputs' ranges
    reuse: bool         # keep the residual stream (GPTQQuantizer._reuse_fits)
    # inputs offloaded to disk (over the activation budget): keep no activations in
    # memory between passes; each group's pass runs from the layer's inputs
    lean: bool
    entry: str = ""
    entry_inputs: list[tuple[tuple, dict]] | None = None
    o_inputs: list[torch.Tensor | None] | None = None
    residuals: list[torch.Tensor] | None = None  # x + o_proj(o_in), per batch when reused
    seconds: float = 0.0

    def _capture(self, k: int) -> str | None:
        """The submodule whose inputs pass ``k`` keeps for the next one: the deepest module
        holding this group and the next, when this pass runs through it."""
        if k + 1 < len(self.groups) and not self.lean:
            parent = _common_parent(self.groups[k] + self.groups[k + 1])
            if parent and _inside(parent, self.entry):
                return parent
        return None

    def _keep(self, k: int) -> tuple[str | None, bool]:
        """The member whose inputs pass ``k`` keeps per batch (o_proj's, to rebuild the MLP's
        inputs; down_proj's, for the layer's outputs) and whether it is that last pass."""
        group, roles = self.groups[k], self.roles
        keep = None
        if k + 1 < len(self.groups) and _mlp_of(roles) and group == [roles.o] and not self.lean:
            keep = roles.o
        last_down = (k == len(self.groups) - 1 and self.residuals is not None
                     and group == [roles.down] and self.entry == roles.mlp)
        if last_down:  # the layer's outputs come from this pass's activations
            keep = roles.down
        return keep, last_down

    def collect(self, k: int) -> tuple[_Stage, bool]:
        """Pass ``k``: group k's Hessians (in the returned stage), and whether :meth:`finish`
        assembles the layer's outputs from it."""
        ctx, roles = self.ctx, self.roles
        capture = self._capture(k)
        t0 = time.perf_counter()
        if self.o_inputs is not None and capture == _mlp_of(roles):
            rebuilt = _mlp_inputs_from_o(ctx, self.o_inputs, keep_residuals=self.reuse)
            if rebuilt is not None:
                self.entry, self.entry_inputs = capture, rebuilt[0]
                self.residuals = rebuilt[1]
            del rebuilt
        self.o_inputs = None
        keep, last_down = self._keep(k)
        stage = _Stage(ctx, self.groups[k], self.track_absmax, keep=keep)
        captured = stage.run(self.entry, self.entry_inputs, capture)
        self.entry_inputs = None  # let the previous pass's activations go
        if keep == roles.o and len(stage.kept) == len(ctx.inputs):
            self.o_inputs, stage.kept = stage.kept, []
        self.seconds += time.perf_counter() - t0
        self.entry, self.entry_inputs = (capture, captured) if capture else ("", None)
        return stage, last_down

    def finish(self, stage: _Stage, last_down: bool) -> None:
        """After the group's solves: on the last down_proj pass, the quantized layer's
        outputs from the residual stream and down_proj's kept inputs."""
        if not last_down:
            return
        assert self.residuals is not None
        if len(stage.kept) == len(self.ctx.inputs):
            self.ctx.quantized_outputs = _assemble_outputs(self.ctx, self.roles,
                                                           self.residuals, stage.kept)
        self.residuals = None


class GPTQQuantizer(Quantizer):
    name = "gptq"
    default_scheme = "W4A16"
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
        act = self.scheme.activations
        options = self.config.options()
        groups = self._groups(ctx)
        roles = ctx.adapter.roles()
        passes = _Passes(ctx, roles, groups, track_absmax=act is not None and not act.dynamic,
                         reuse=self._reuse_fits(ctx, roles), lean=ctx.offloaded)
        stats: dict[str, Any] = {}
        total_loss = 0.0
        total_rtn = 0.0
        for k, group in enumerate(groups):
            _check_linears(ctx, group)
            stage, last_down = passes.collect(k)
            for names in _by_hessian(stage, group):
                for loss, rtn in self._solve_shared(ctx, stage, names, options, stats):
                    total_loss += loss
                    total_rtn += rtn
            passes.finish(stage, last_down)
            del stage
        ctx.backend.empty_cache()  # the solver's temporaries fragment the heap
        stats["loss"] = total_loss
        stats["rtn_loss"] = total_rtn
        stats["hessian_seconds"] = passes.seconds
        return stats

    def _solve_shared(self, ctx: LayerContext, stage: _Stage, names: list[str],
                      options: GPTQOptions, stats: dict[str, Any]) -> list[tuple[float, float]]:
        """One GPTQ solve of the linears ``names`` (fed one input, sharing its Hessian) with
        their weights stacked row-wise, each linear then replaced by its QuantLinear.
        Returns each one's (GPTQ, RTN) objective."""
        t1 = time.perf_counter()
        acc = stage.hessian(names[0])
        linears = [ctx.submodule(n) for n in names]
        # the passes' freed activations fragment the heap; hand them back before
        # the columns x columns temporaries (three of 321 MB at 8960)
        ctx.backend.empty_cache()
        label = f"{ctx.name}.{'/'.join(names)}"
        factor = factor_hessian(acc.H, options, linalg=ctx.backend, name=label)
        weight = linears[0].weight if len(linears) == 1 else \
            torch.cat([lin.weight for lin in linears])
        result = gptq_quantize(weight, acc.H, self.scheme.weights, options, factor=factor,
                               name=label, loss=False)
        del weight, factor
        solve_seconds = time.perf_counter() - t1
        losses = []
        start = 0
        for name, linear in zip(names, linears, strict=True):
            rows = slice(start, start + linear.out_features)
            start = rows.stop
            loss, rtn = self._replace(ctx, stage, name, linear, result, rows, stats)
            # a shared solve's time, split by rows
            stats[f"{name}.seconds"] = solve_seconds * linear.out_features / len(result.Q)
            ctx.log.debug("%s.%s: GPTQ loss %.4g (RTN %.4g), damp %.4g, %d tokens",
                          ctx.name, name, loss, rtn, result.damp, acc.tokens)
            losses.append((loss, rtn))
        return losses

    def _replace(self, ctx: LayerContext, stage: _Stage, name: str, linear: nn.Linear,
                 result: GPTQResult, rows: slice, stats: dict[str, Any]) -> tuple[float, float]:
        """Replace ``linear`` by the QuantLinear of its ``rows`` of the (stacked) solve and
        record its stats; returns its GPTQ and RTN objectives."""
        H = stage.hessian(name).H
        Q = result.Q[rows]
        loss = objective(linear.weight, Q, H)
        rtn = objective(linear.weight, fake_quantize_weight(
            linear.weight.float(), self.scheme.weights), H)
        # own copies: a view of the stacked result would share its storage
        # with the other linears' tensors (and be saved as one)
        q = QuantLinear.from_solved(
            linear, SolvedWeight(Q, result.scale[rows].clone(), result.zero[rows].clone(),
                                 result.g_idx.clone()),
            self.scheme.weights, activations=self.scheme.activations)
        if stage.track_absmax:  # static activation scales
            m = stage.input_absmax(name).max()
            stats[f"{name}.input_scale"] = q.set_input_range(-m, m)
        ctx.replace(name, q)
        stats[f"{name}.loss"] = loss
        stats[f"{name}.rtn_loss"] = rtn
        stats[f"{name}.damp"] = result.damp
        if result.damp_raises:
            stats[f"{name}.damp_raises"] = result.damp_raises
        if result.dead:
            stats[f"{name}.dead_inputs"] = result.dead
        return loss, rtn

    def _reuse_fits(self, ctx: LayerContext, roles: LayerRoles) -> bool:
        """Whether down_proj's inputs and the residual stream of every batch fit the
        budget (in float32, the precision the layer runs in)."""
        if roles.down is None or _mlp_of(roles) is None or not ctx.inputs:
            return False
        if ctx.offloaded:  # see _Passes.lean
            return False
        tokens = sum(ctx.batch_tokens())
        features = ctx.submodule(roles.down).in_features + ctx.batch_shapes()[0][-1]
        return tokens * features * 4 <= self.config.reuse_budget_mb * 2**20


def _mlp_of(roles: LayerRoles) -> str | None:
    """The MLP block when the layer is pre-norm residual with known o/MLP-norm roles (its
    MLP inputs can be rebuilt from the o_proj inputs), else None."""
    if roles.pre_norm_residual and not roles.missing(("mlp", "o", "mlp_norm")):
        return roles.mlp
    return None


def _mlp_inputs_from_o(ctx: LayerContext, o_inputs: list[torch.Tensor | None],
                       keep_residuals: bool = False
                       ) -> tuple[list[tuple[tuple, dict]], list[torch.Tensor] | None] | None:
    """The MLP's inputs of a pre-norm residual layer, ``norm2(h)`` with the residual stream
    ``h = x + o_proj(o_in)``, from the o_proj inputs kept by the previous pass: the gate/up
    pass then skips q/k/v and the attention. Returns the MLP inputs and (when
    ``keep_residuals``) h per batch. Checked against the real layer on the first batch;
    None (run the layer) when the layer computes something else."""
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
    first = ctx.inputs[0] + o_proj(o_inputs[0])
    if not real or not torch.allclose(norm(first), real[0], rtol=1e-5, atol=1e-6):
        ctx.log.debug("%s: the MLP input is not norm2(x + o_proj(o_in)); running the layer",
                      ctx.name)
        return None
    rebuilt, residuals = [((real[0],), {})], [first]
    o_inputs[0] = None  # consumed as we go: one extra activation buffer, not two
    for b in range(1, len(o_inputs)):
        h = ctx.inputs[b] + o_proj(o_inputs[b])
        o_inputs[b] = None
        rebuilt.append(((norm(h),), {}))
        if keep_residuals:
            residuals.append(h)
    return rebuilt, residuals if keep_residuals else None


def _assemble_outputs(ctx: LayerContext, roles: LayerRoles, residuals: list[torch.Tensor],
                      down_inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
    """The quantized layer's outputs ``h + down_proj(down_in)`` from the residual stream and
    down_proj's inputs the last passes kept (consumed), without running the layer again.
    Checked against the real layer on the first batch; None (the pipeline runs the layer)
    if they differ."""
    down = ctx.submodule(roles.down)
    outputs = []
    for b in range(len(residuals)):
        outputs.append(residuals[b].add_(down(down_inputs[b])))
        residuals[b] = down_inputs[b] = None  # type: ignore[call-overload]
    real = ctx.forward(batches=1)[0]
    if not torch.allclose(outputs[0], real, rtol=1e-5, atol=1e-6):
        ctx.log.debug("%s: the layer's output is not h + mlp(norm2(h)); running the layer",
                      ctx.name)
        return None
    return outputs
