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
        reuse = self._reuse_fits(ctx, roles)
        # inputs offloaded to disk (over the activation budget): keep no activations in
        # memory between passes; each group's pass runs from the layer's inputs
        lean = ctx.offloaded
        residuals: list[torch.Tensor] | None = None  # x + o_proj(o_in), per batch when reused
        hessian_seconds = 0.0
        total_loss = 0.0
        total_rtn = 0.0
        for k, group in enumerate(groups):
            for name in group:
                if not isinstance(ctx.submodule(name), nn.Linear):
                    raise TypeError(f"{ctx.name}.{name} is {type(ctx.submodule(name)).__name__},"
                                    " not nn.Linear")
            capture = None
            if k + 1 < len(groups) and not lean:
                parent = _common_parent(group + groups[k + 1])
                if parent and _inside(parent, entry):
                    capture = parent
            t0 = time.perf_counter()
            if o_inputs is not None and capture == _mlp_of(roles):
                rebuilt = _mlp_inputs_from_o(ctx, o_inputs, keep_residuals=reuse)
                if rebuilt is not None:
                    (entry, entry_inputs), residuals = (capture, rebuilt[0]), rebuilt[1]
                del rebuilt
            o_inputs = None
            keep = None
            if k + 1 < len(groups) and _mlp_of(roles) and group == [roles.o] and not lean:
                keep = roles.o
            last_down = (k == len(groups) - 1 and residuals is not None
                         and group == [roles.down] and entry == roles.mlp)
            if last_down:  # the layer's outputs come from this pass's activations
                keep = roles.down
            stage = _Stage(ctx, group, static_act, keep=keep)
            captured = stage.run(entry, entry_inputs, capture)
            entry_inputs = None  # let the previous pass's activations go
            if keep == roles.o and len(stage.kept) == len(ctx.inputs):
                o_inputs, stage.kept = stage.kept, []
            hessian_seconds += time.perf_counter() - t0
            entry, entry_inputs = (capture, captured) if capture else ("", None)
            del captured
            # linears fed the same input share one Hessian: one factorisation, and their
            # weights stacked row-wise go through one solve (GPTQ treats rows independently)
            shared: dict[int, list[str]] = {}
            for name in group:
                shared.setdefault(id(stage.hessian(name)), []).append(name)
            for names in shared.values():
                t1 = time.perf_counter()
                acc = stage.hessian(names[0])
                linears = [ctx.submodule(n) for n in names]
                # the passes' freed activations fragment the heap; hand them back before
                # the columns x columns temporaries (three of 321 MB at 8960)
                ctx.backend.empty_cache()
                label = f"{ctx.name}.{'/'.join(names)}"
                factor = factor_hessian(
                    acc.H, act_order=cfg.act_order, damp=cfg.damp, damp_step=cfg.damp_step,
                    damp_max_steps=cfg.damp_max_steps, cholesky=ctx.backend.cholesky,
                    cholesky_inverse=ctx.backend.cholesky_inverse, name=label)
                weight = linears[0].weight if len(linears) == 1 else \
                    torch.cat([lin.weight for lin in linears])
                result = gptq_quantize(
                    weight, acc.H, self.scheme.weights, block_size=cfg.block_size,
                    act_order=cfg.act_order, static_groups=cfg.static_groups, mse=mse,
                    factor=factor, name=label, loss=False)
                del weight, factor
                solve_seconds = time.perf_counter() - t1
                start = 0
                for name, linear in zip(names, linears, strict=True):
                    rows = slice(start, start + linear.out_features)
                    start = rows.stop
                    Q = result.Q[rows]
                    loss = objective(linear.weight, Q, acc.H)
                    rtn = objective(linear.weight, fake_quantize_weight(
                        linear.weight.float(), self.scheme.weights), acc.H)
                    # own copies: a view of the stacked result would share its storage
                    # with the other linears' tensors (and be saved as one)
                    q = QuantLinear.from_solved(
                        linear, SolvedWeight(Q, result.scale[rows].clone(),
                                             result.zero[rows].clone(), result.g_idx.clone()),
                        self.scheme.weights, activations=self.scheme.activations)
                    if static_act:
                        m = stage.input_absmax(name).max()
                        stats[f"{name}.input_scale"] = q.set_input_range(-m, m)
                    ctx.replace(name, q)
                    total_loss += loss
                    total_rtn += rtn
                    stats[f"{name}.loss"] = loss
                    stats[f"{name}.rtn_loss"] = rtn
                    stats[f"{name}.damp"] = result.damp
                    if result.damp_raises:
                        stats[f"{name}.damp_raises"] = result.damp_raises
                    if result.dead:
                        stats[f"{name}.dead_inputs"] = result.dead
                    # a shared solve's time, split by rows
                    stats[f"{name}.seconds"] = solve_seconds * linear.out_features / len(
                        result.Q)
                    ctx.log.debug("%s.%s: GPTQ loss %.4g (RTN %.4g), damp %.4g, %d tokens",
                                  ctx.name, name, loss, rtn, result.damp, acc.tokens)
                del result
            if last_down:
                assert residuals is not None
                if len(stage.kept) == len(ctx.inputs):
                    ctx.quantized_outputs = _assemble_outputs(ctx, roles, residuals,
                                                              stage.kept)
                residuals = None
            del stage
        ctx.backend.empty_cache()  # the solver's temporaries fragment the heap
        stats["loss"] = total_loss
        stats["rtn_loss"] = total_rtn
        stats["hessian_seconds"] = hessian_seconds
        return stats

    def _reuse_fits(self, ctx: LayerContext, roles: LayerRoles) -> bool:
        """Whether down_proj's inputs and the residual stream of every batch fit the
        budget (in float32, the precision the layer runs in)."""
        if roles.down is None or _mlp_of(roles) is None or not ctx.inputs:
            return False
        if ctx.offloaded:  # see `lean` in quantize_layer
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
