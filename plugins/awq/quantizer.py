"""AWQ: activation-aware weight quantization (Lin et al., 2023; reference: mit-han-lab/llm-awq).

Per decoder layer, on the full-precision layer and full-precision inputs:

1. One pass over the calibration windows with hooks collects, for every smoothing group
   the architecture adapter names (``LinearGroup(prev, linears, block, kind)``), the mean
   ``|x|`` per input channel of the group's linears, the calls the layer makes to the
   group's block (for blocks such as attention or the MLP), the Gram matrix ``X^T X`` of
   the input (for a group whose block is its single linear, e.g. up -> down), and 512
   strided tokens of every linear's input for the clip search.
2. Scale search per group on the original weights: ``s = s_x ** r`` normalised, for r on
   a grid, scored by the block-output MSE with the group's linears replaced by
   ``Q(W s) / s``; the first best ratio wins (r = 0 is plain round-to-nearest).
3. Every group's best ``s`` is folded exactly: previous norm weight (or previous linear's
   rows) divided by ``s``, the linears' columns multiplied.
4. Clip search on the scaled weights and the correspondingly scaled token sample (skipped
   for q and k), then every linear becomes a :class:`QuantLinear`.

The next layer's inputs are the full-precision outputs (``propagation = "full"``), as in
the reference, which computes scales and clips on the full-precision model.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from qcore.context import LayerContext
from qcore.interfaces import Quantizer, UnsupportedScheme
from qcore.models.adapter import LinearGroup
from qcore.quant.folding import fold_scale
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantScheme
from qcore_awq.search import (
    BlockScorer,
    GramScorer,
    ScaleResult,
    apply_clip,
    search_clip,
    search_scale,
)

log = logging.getLogger(__name__)


class AWQConfig(BaseModel):
    """Options of the ``awq`` quantizer (``--set key=value``)."""

    model_config = ConfigDict(extra="forbid")

    n_grid: int = Field(
        default=20, ge=1,
        description="scale-search grid: ratios r = i / n_grid for i = 0 .. n_grid - 1 "
        "(r = 1 is never tried, as in llm-awq)",
    )
    scale: bool = Field(default=True, description="run the activation-aware scale search")
    clip: bool = Field(default=True, description="run the weight clip search after scaling")
    clip_grid: int = Field(
        default=20, ge=1, description="clip grid: bound = max|w| * (1 - i / clip_grid)"
    )
    max_shrink: float = Field(
        default=0.5, gt=0.0, lt=1.0,
        description="largest fraction of max|w| the clip search may remove",
    )
    clip_tokens: int = Field(
        default=512, ge=1,
        description="strided token sample of each linear's input used by the clip search",
    )
    clip_batch_rows: int = Field(
        default=256, ge=1, description="output rows per clip-search batch (memory bound)"
    )
    clip_skip: list[str] = Field(
        default_factory=lambda: ["q_", "k_", "query", "key", "Wqkv"],
        description="linears whose name contains one of these are not clipped (q/k feed "
        "the q.k product, hard to clip precisely; as in llm-awq)",
    )
    search_samples: int | None = Field(
        default=None, ge=1,
        description="calibration windows whose block outputs score the scale search "
        "(rounded up to whole calibration batches); None = all, as in llm-awq. The "
        "activation statistics and the clip sample always use every window.",
    )
    quantize: bool = Field(
        default=True,
        description="False folds the searched scales (and clips) into the float weights "
        "but leaves the linears unquantized (for checking the folding)",
    )

    @field_validator("clip_skip")
    @classmethod
    def _no_empty(cls, value: list[str]) -> list[str]:
        if any(not v for v in value):
            raise ValueError("clip_skip entries must be non-empty strings ('' matches all)")
        return value


def _label(group: LinearGroup) -> str:
    short = ",".join(name.rsplit(".", 1)[-1] for name in group.linears)
    return f"{group.prev.rsplit('.', 1)[-1]}->{short}"


class _Collector:
    """Forward hooks gathering what the searches need in one pass over the calibration."""

    def __init__(self, ctx: LayerContext, groups: list[LinearGroup], gram_groups: set[int],
                 block_groups: set[int], clip_names: list[str], clip_tokens: int,
                 search_batches: int) -> None:
        self.ctx = ctx
        self.total_tokens = sum(ctx.batch_tokens())
        self.stride = max(1, self.total_tokens // clip_tokens)
        self.abs_sum: dict[str, torch.Tensor] = {}
        self.gram: dict[str, torch.Tensor] = {}
        self.sample: dict[str, list[torch.Tensor]] = {}
        self.seen: dict[str, int] = {}
        self.batches: dict[str, int] = {}
        self.gram_tokens: dict[str, int] = {}
        self.calls: dict[str, list[tuple[tuple, dict]]] = {}
        self.search_batches = search_batches
        self.stat_names = {groups[i].linears[0] for i in range(len(groups))}
        self.gram_names = {groups[i].linears[0] for i in gram_groups}
        self.block_names = {groups[i].block for i in block_groups}
        self.clip_names = set(clip_names)
        self.handles: list[Any] = []

    def linear_hook(self, name: str, _m: nn.Module, x: torch.Tensor, _y: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        if name in self.stat_names:
            acc = flat.abs().sum(dim=0, dtype=torch.float64)
            self.abs_sum[name] = acc if name not in self.abs_sum else self.abs_sum[name] + acc
        batch_index = self.batches.get(name, 0)
        self.batches[name] = batch_index + 1
        if name in self.gram_names and batch_index < self.search_batches:
            # scored on the same windows as the block groups
            f = flat.float()
            self.gram_tokens[name] = self.gram_tokens.get(name, 0) + f.shape[0]
            g = (f.T @ f).double()
            self.gram[name] = g if name not in self.gram else self.gram[name] + g
        if name in self.clip_names:
            offset = self.seen.get(name, 0)
            first = (-offset) % self.stride
            picked = flat[first:: self.stride].float().clone()
            self.sample.setdefault(name, []).append(picked)
        self.seen[name] = self.seen.get(name, 0) + flat.shape[0]

    def block_pre_hook(self, name: str):
        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            calls = self.calls.setdefault(name, [])
            if len(calls) < self.search_batches:
                calls.append((tuple(args), dict(kwargs)))
        return hook

    def attach(self) -> dict[str, Any]:
        """Register the block pre-hooks; the linear hooks to run in a forward of the layer
        over every batch (:meth:`detach` afterwards)."""
        self.handles = [
            self.ctx.submodule(b).register_forward_pre_hook(self.block_pre_hook(b),
                                                            with_kwargs=True)
            for b in sorted(self.block_names)
        ]
        return {n: self.linear_hook for n in sorted(self.stat_names | self.gram_names
                                                    | self.clip_names)}

    def detach(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def run(self) -> None:
        """A forward pass of the layer of its own."""
        try:
            self.ctx.forward(self.attach(), keep_outputs=False)
        finally:
            self.detach()

    def mean_abs(self, name: str) -> torch.Tensor:
        return (self.abs_sum[name] / self.seen[name]).float()

    def clip_sample(self, name: str) -> torch.Tensor:
        return torch.cat(self.sample[name], dim=0)


class AWQQuantizer(Quantizer):
    name = "awq"
    default_scheme = "W4A16"
    Config = AWQConfig
    description = "activation-aware weight quantization: per-channel scale and clip search"
    propagation = "full"

    def check_scheme(self, scheme: QuantScheme) -> None:
        if scheme.activations is not None or scheme.kv_cache is not None:
            raise UnsupportedScheme(
                f"awq quantizes weights only; scheme {scheme.name} also quantizes "
                f"{'activations' if scheme.activations is not None else 'the KV cache'} "
                "(use W4A16/W3A16-style schemes, or smoothquant/flatquant)"
            )
        if scheme.weights.granularity == "tensor":
            raise UnsupportedScheme(
                "awq needs per-channel or per-group weight quantization, not 'tensor' "
                f"(scheme {scheme.name})"
            )

    # ------------------------------------------------------------------ groups
    def _valid_groups(self, ctx: LayerContext) -> tuple[list[LinearGroup], list[str]]:
        groups, skipped = [], []
        for group in ctx.adapter.smooth_groups(ctx.layer):
            linears = [ctx.submodule(n) for n in group.linears]
            prev = ctx.submodule(group.prev)
            in_features = {lin.in_features for lin in linears}
            reason = None
            if not all(isinstance(lin, nn.Linear) for lin in linears):
                reason = "its linears are not all nn.Linear"
            elif len(in_features) != 1:
                reason = f"its linears differ in input features {sorted(in_features)}"
            elif group.kind == "norm" and (
                    not isinstance(getattr(prev, "weight", None), torch.Tensor)
                    or tuple(prev.weight.shape) != (next(iter(in_features)),)):
                reason = (f"{group.prev} has no per-channel weight of size "
                          f"{next(iter(in_features))} to fold a scale into")
            elif group.kind == "linear" and (not isinstance(prev, nn.Linear)
                                             or prev.out_features not in in_features):
                reason = (f"{group.prev} has {getattr(prev, 'out_features', '?')} outputs "
                          f"but {group.linears[0]} takes {next(iter(in_features))} inputs")
            if reason:
                skipped.append(f"{group.prev}->{','.join(group.linears)}")
                log.info("%s: skipping AWQ group %s: %s", ctx.name, _label(group), reason)
                continue
            groups.append(group)
        covered = {n for g in groups for n in g.linears}
        v, o = getattr(ctx.adapter, "V", None), getattr(ctx.adapter, "O", None)
        if v and o and o not in covered:
            vw, ow = ctx.submodule(v).weight, ctx.submodule(o).weight
            info = ctx.adapter.attention_info()
            skipped.append(f"{v}->{o}")
            log.info(
                "%s: no %s -> %s scale group: weight shapes %s and %s differ "
                "(grouped-query attention, %d query / %d KV heads)",
                ctx.name, v, o, tuple(vw.shape), tuple(ow.shape), info.num_heads,
                info.num_kv_heads,
            )
        return groups, skipped

    # ------------------------------------------------------------------ per layer
    def __init__(self, config: BaseModel, scheme: QuantScheme) -> None:
        super().__init__(config, scheme)
        self._pending: tuple[_Collector, list[LinearGroup], list[str], set[int]] | None = None

    def _collector(self, ctx: LayerContext
                   ) -> tuple[_Collector, list[LinearGroup], list[str], set[int]]:
        """What the searches of this layer need, and the hooks that collect it."""
        cfg: AWQConfig = self.config
        names = ctx.adapter.linear_names()
        groups, skipped = self._valid_groups(ctx) if cfg.scale else ([], [])
        clip_names = [n for n in names if not any(p in n for p in cfg.clip_skip)] \
            if cfg.clip else []
        batch = ctx.batch_shapes()[0][0] if ctx.inputs else 1
        search_batches = len(ctx.inputs) if cfg.search_samples is None else \
            min(len(ctx.inputs), math.ceil(cfg.search_samples / batch))
        search_tokens = sum(ctx.batch_tokens()[:search_batches])
        # a group scored on its own single linear uses the Gram matrix of the input when
        # that is cheaper than replaying the linear (more scoring tokens than inputs)
        gram_groups = {i for i, g in enumerate(groups)
                       if g.kind == "linear" and g.linears == (g.block,)
                       and search_tokens > ctx.submodule(g.block).in_features}
        block_groups = set(range(len(groups))) - gram_groups
        collector = _Collector(ctx, groups, gram_groups, block_groups, clip_names,
                               cfg.clip_tokens, search_batches)
        return collector, groups, skipped, gram_groups

    def float_pass_hooks(self, ctx: LayerContext) -> dict[str, Any]:
        """The statistics, block calls and token samples come from the pipeline's pass of
        the float layer (its outputs are the next layer's inputs anyway)."""
        self._pending = self._collector(ctx)
        return self._pending[0].attach()

    @torch.no_grad()
    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        cfg: AWQConfig = self.config
        args = self.scheme.weights
        names = ctx.adapter.linear_names()
        if self._pending is not None and self._pending[0].ctx is ctx:
            (collector, groups, skipped, gram_groups), self._pending = self._pending, None
            collector.detach()
        else:  # called outside the pipeline's float pass
            collector, groups, skipped, gram_groups = self._collector(ctx)
            if groups or collector.clip_names:
                collector.run()
        clip_names = sorted(collector.clip_names, key=names.index)

        stats: dict[str, Any] = {}
        if skipped:
            stats["skipped_groups"] = skipped
        # 1. scale search on the original weights, every group before any folding
        results: list[tuple[LinearGroup, ScaleResult]] = []
        for i, group in enumerate(groups):
            linears = [ctx.submodule(n) for n in group.linears]
            s_x = collector.mean_abs(group.linears[0])
            if i in gram_groups:
                scorer = GramScorer(linears[0].weight, collector.gram[group.linears[0]],
                                    collector.gram_tokens[group.linears[0]])
            else:
                scorer = BlockScorer(ctx.submodule(group.block), linears,
                                     collector.calls[group.block])
            res = search_scale(s_x, [lin.weight for lin in linears], scorer, args, cfg.n_grid)
            del scorer
            results.append((group, res))
            label = _label(group)
            stats[f"{label}.ratio"] = res.ratio
            stats[f"{label}.error_before"] = res.error_before
            stats[f"{label}.error_after"] = res.error_after
            log.info("%s: AWQ %s ratio %.2f, block MSE %.3e -> %.3e", ctx.name, label,
                     res.ratio, res.error_before, res.error_after)

        # 2. fold every scale exactly
        consumer_scale: dict[str, torch.Tensor] = {}
        for group, res in results:
            linears = [ctx.submodule(n) for n in group.linears]
            fold_scale(ctx.submodule(group.prev), linears, res.scale, group.kind)
            for n in group.linears:
                consumer_scale[n] = res.scale
        collector.gram.clear()
        collector.calls.clear()

        # 3. clip search on the scaled weights and scaled token sample
        for name in clip_names:
            linear = ctx.submodule(name)
            x = collector.clip_sample(name)
            if name in consumer_scale:
                x = x / consumer_scale[name].to(x).view(1, -1)
            clip = search_clip(linear.weight, x, args, cfg.clip_grid, cfg.max_shrink,
                               cfg.clip_batch_rows)
            apply_clip(linear, clip.max_val, args)
            short = name.rsplit(".", 1)[-1]
            stats[f"{short}.clip_error_before"] = clip.error_before
            stats[f"{short}.clip_error_after"] = clip.error_after
            stats[f"{short}.clip_mean_shrink"] = clip.mean_shrink

        # 4. quantize
        if cfg.quantize:
            for name in names:
                linear = ctx.submodule(name)
                if not isinstance(linear, nn.Linear):
                    raise TypeError(f"{ctx.name}.{name} is {type(linear).__name__}, "
                                    "not nn.Linear")
                ctx.replace(name, QuantLinear.from_float(linear, args))
        return stats
