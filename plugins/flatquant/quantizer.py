"""FlatQuant (Sun et al., 2024): learned affine transforms trained one decoder layer at a time.

The quantizer builds each layer's learnables (:mod:`qcore_flatquant.learnables`), trains
them against the float layer's outputs (:mod:`qcore_flatquant.training`) or reloads them
from a ``matrices`` folder (:mod:`qcore_flatquant.matrices`), folds them into the layer
(:mod:`qcore_flatquant.folding`) and rounds the folded weights with the weight solver its
``weight_method`` names. ``ascend`` picks msModelSlim's variant
(:mod:`qcore_flatquant.variant`); the options are in :mod:`qcore_flatquant.config`.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from qcore.context import LayerContext
from qcore.interfaces import ComposesSolver, UnsupportedScheme
from qcore.quant.kvcache import (
    ATTN_IMPLEMENTATION,
    KVCacheQuantizer,
    KVCacheSpec,
    register_attention,
)
from qcore.quant.linear import QuantLinear
from qcore.schemes import QuantArgs, QuantScheme
from qcore_flatquant.config import FlatQuantConfig
from qcore_flatquant.folding import fold_layer
from qcore_flatquant.learnables import CompileFallback, LayerTransforms
from qcore_flatquant.matrices import (
    fingerprint,
    identity,
    load_matrices,
    matrix_file,
    save_matrices,
)
from qcore_flatquant.training import train_layer
from qcore_flatquant.variant import variant_for


class FlatQuantQuantizer(ComposesSolver):
    name = "flatquant"
    default_scheme = "W4A4"
    Config = FlatQuantConfig
    description = "learned Kronecker affine transforms + learned clipping, per layer (W4A4/W8A8)"
    propagation = "full"
    needs_fp_outputs = True  # the training targets
    required_roles = ("attention", "q", "k", "v", "o", "gate", "up", "down", "attention_norm",
                      "mlp_norm")

    def __init__(self, config: FlatQuantConfig, scheme: QuantScheme) -> None:
        self.variant = variant_for(config)  # check_scheme asks it
        super().__init__(config, scheme)
        self.scheme = self.variant.scheme(scheme)
        #: torch.compile failing under the default ``fuse``: the run's later layers train
        #: eagerly
        self.compile_fallback = CompileFallback()

    def check_scheme(self, scheme: QuantScheme) -> None:
        self.variant.check_scheme(scheme)
        if scheme.kv_cache is not None and not scheme.kv_cache.dynamic:
            raise UnsupportedScheme(
                f"flatquant quantizes the KV cache dynamically (per token and head, with its "
                f"learned key transform); scheme {scheme.name} asks static KV scales "
                f"({scheme.kv_cache.describe()}): use W4A4KV4, or smoothquant for static KV")
        act = scheme.activations
        if act is not None and act.granularity != "token":
            raise UnsupportedScheme(
                f"flatquant quantizes activations per token (dynamic); scheme {scheme.name} "
                f"asks activations.granularity={act.granularity!r}")
        if scheme.weights.granularity == "tensor":
            raise UnsupportedScheme(f"flatquant needs per-channel or per-group weights, not "
                                    f"per-tensor (scheme {scheme.name})")

    def online_transforms(self) -> bool:
        return True  # each QuantLinear keeps its Kronecker transform as input_transform

    def prepare(self, model: nn.Module, adapter: Any) -> None:
        self.weight_solver()  # bound before the run
        if self.scheme.kv_cache is not None:
            # attention through qcore_kv; a layer gets its qcore_kv module when it is trained
            register_attention()
            model.set_attn_implementation(ATTN_IMPLEMENTATION)

    def _roles(self, adapter: Any) -> dict[str, str]:
        r = adapter.roles()
        return {"q": r.q, "k": r.k, "v": r.v, "o": r.o, "gate": r.gate, "up": r.up,
                "down": r.down}

    def build_transforms(self, ctx: LayerContext, init_diag: bool = True) -> LayerTransforms:
        """The layer's learnables at their init (``init_diag=False``: skip the calibration
        pass of the per-channel scales' init, for learnables about to be loaded)."""
        info = ctx.adapter.attention_info()
        roles = self._roles(ctx.adapter)
        gen = torch.Generator().manual_seed(self.config.seed + ctx.index)
        with_key = self.scheme.kv_cache is not None and self.config.key_transform
        owner = LayerTransforms(ctx.layer, roles, info.num_heads, info.head_dim,
                                info.num_kv_heads, self.config, with_key, gen)
        owner.to(ctx.device)
        owner.fallback = self.compile_fallback
        owner.fuse = self.config.fuse if self.config.fuse is not None else \
            ctx.device.type == "cpu" and self.compile_fallback.failure is None
        if self.config.add_diag and init_diag:
            absmax = ctx.input_absmax([roles["q"], roles["gate"], roles["down"]])
            owner.init_diag(ctx.layer, absmax)
        return owner

    def train(self, ctx: LayerContext, owner: LayerTransforms) -> dict[str, Any]:
        """Train the layer's learnables; returns the training statistics."""
        return train_layer(ctx, owner, self.scheme, self.config)

    def install(self, ctx: LayerContext, owner: LayerTransforms) -> dict[str, Any]:
        """Fold, round the weights with the weight solver and attach the online transforms.

        A Hessian-based solver must see what each QuantLinear really multiplies, so the
        linears are first put in place rounded to nearest (with their transforms and the KV
        quantizer), then solved group by group."""
        roles = ctx.adapter.roles()
        act = self.scheme.activations
        acts = self._activations(owner)
        transforms, key = fold_layer(ctx.layer, owner, (roles.attention_norm, roles.mlp_norm),
                                     act)
        folded = {name: ctx.submodule(name) for name in transforms}
        if self.weight_solver().needs_hessian:
            for name, tr in transforms.items():
                ctx.replace(name, QuantLinear.from_float(
                    folded[name], self.scheme.weights, activations=acts[name],
                    input_transform=tr))
        stats: dict[str, Any] = {}
        attn = ctx.submodule(roles.attention)
        kv = self.scheme.kv_cache
        if kv is not None:
            spec = KVCacheSpec(keys=kv, values=kv,
                               key_transform=key.spec() if key is not None else None)
            attn.qcore_kv = KVCacheQuantizer(spec, key_transform=key)
        stats.update(ctx.solve_linears(self.weight_solver(), folded, self.scheme.weights,
                                       activations=acts, transforms=transforms))
        return stats

    def _activations(self, owner: LayerTransforms) -> dict[str, QuantArgs | None]:
        """Each linear's activation quantizer (the variant's choice)."""
        act = self.scheme.activations
        if act is None:
            return dict.fromkeys(owner.names.values(), act)
        return self.variant.activations(owner, act)

    def _identity(self, ctx: LayerContext) -> dict[str, Any]:
        """What this layer's training depends on (checked against a saved matrices file)."""
        return identity(self.scheme, self.config, ctx.name,
                        weights=fingerprint(ctx.layer.parameters()),
                        inputs=fingerprint(ctx.inputs))

    def trained_transforms(self, ctx: LayerContext) -> tuple[LayerTransforms, dict[str, Any]]:
        """The layer's trained learnables and training statistics: trained now, or loaded
        from the ``matrices`` folder (and saved there once trained)."""
        if self.config.matrices is None:
            owner = self.build_transforms(ctx)
            return owner, self.train(ctx, owner)
        path = matrix_file(self.config.matrices, ctx.name)
        ident = self._identity(ctx)
        if path.exists():
            state, stats = load_matrices(path, ident)
            owner = self.build_transforms(ctx, init_diag=False)
            owner.load_state_dict(state)
            ctx.log.info("%s: flatquant matrices loaded from %s", ctx.name, path)
            return owner, {**stats, "reloaded": True}
        owner = self.build_transforms(ctx)
        stats = self.train(ctx, owner)
        save_matrices(path, owner.state_dict(), ident, stats)
        return owner, stats

    def quantize_layer(self, ctx: LayerContext) -> dict[str, Any]:
        t0 = time.perf_counter()
        owner, stats = self.trained_transforms(ctx)
        stats.update(self.install(ctx, owner))
        stats["seconds_total"] = time.perf_counter() - t0
        ctx.log.info("%s: flatquant loss %.3e -> %.3e in %.1fs", ctx.name, stats["loss_start"],
                     stats["loss_end"], stats["train_seconds"])
        return stats
