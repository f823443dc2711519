"""Architecture adapters: what quantization methods need to know about a decoder model. An adapter
names the decoder layers, the quantizable linears of a layer, the groups a smoothing method scales
together (:class:`LinearGroup`), the true-sequential order of the linears, attention shapes, and the
*roles* of a layer's parts (:class:`LayerRoles`). Methods read roles, never an adapter's own
attributes, and declare the roles they need (``Quantizer.required_roles``); a model whose adapter
lacks one is refused before any work. :class:`LlamaLikeAdapter` (the Llama layout, which Qwen2,
Mistral and many others share) is also the generic fallback for unregistered model types: it checks
the layout and logs what it assumed instead of refusing."""

from __future__ import annotations

import logging
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import nn

log = logging.getLogger(__name__)


class LinearGroup(BaseModel):
    """Linears that share one input, the operator feeding them, and the scored module:
    ``prev`` is a norm (kind "norm") or a linear (kind "linear") whose output channels can
    absorb a per-channel scale; ``block`` is the submodule whose output a search scores."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prev: str
    linears: tuple[str, ...]
    block: str
    kind: Literal["norm", "linear"]


class AttentionInfo(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def grouped(self) -> bool:
        return self.num_kv_heads != self.num_heads


class LayerRoles(BaseModel):
    """Where each part of a decoder layer lives (module names relative to the layer). None:
    the architecture has no such part, or the adapter does not say; a method that needs it
    declares it in ``required_roles`` and is refused up front."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    attention: str | None = None   # the attention block (called with hidden_states=...)
    mlp: str | None = None         # the MLP block
    q: str | None = None
    k: str | None = None
    v: str | None = None
    o: str | None = None
    gate: str | None = None
    up: str | None = None
    down: str | None = None
    attention_norm: str | None = None  # the norm whose output feeds q/k/v
    mlp_norm: str | None = None        # the norm whose output feeds gate/up
    q_norm: str | None = None          # per-head norm after q (Qwen3), before RoPE
    k_norm: str | None = None
    #: pre-norm residual layout: ``h = x + attn(norm1(x)); y = h + mlp(norm2(h))``
    pre_norm_residual: bool = False
    #: linears fed the same tensor (one Hessian / one smoothing scale serves them all)
    shared_inputs: tuple[tuple[str, ...], ...] = ()
    info: AttentionInfo | None = None

    def missing(self, roles: tuple[str, ...] | list[str]) -> list[str]:
        return [r for r in roles if getattr(self, r) is None]


#: every role name a method may require
ROLE_NAMES = tuple(n for n in LayerRoles.model_fields
                   if n not in ("pre_norm_residual", "shared_inputs", "info"))


class ArchitectureAdapter:
    """Base adapter; subclasses set ``name`` and ``model_types`` and may override any part."""

    name: ClassVar[str] = "generic"
    model_types: ClassVar[tuple[str, ...]] = ()
    description: ClassVar[str] = ""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config

    def decoder_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def layer_prefix(self, index: int) -> str:
        raise NotImplementedError

    def linear_names(self) -> list[str]:
        """Quantizable linears of one decoder layer, relative to the layer."""
        return [name for group in self.sequential_groups() for name in group]

    def sequential_groups(self) -> list[list[str]]:
        raise NotImplementedError

    def smooth_groups(self, layer: nn.Module) -> list[LinearGroup]:
        raise NotImplementedError

    def attention_info(self) -> AttentionInfo:
        raise NotImplementedError

    def roles(self) -> LayerRoles:
        """The roles of a decoder layer's parts; the base adapter names none."""
        return LayerRoles()


class LlamaLikeAdapter(ArchitectureAdapter):
    name = "llama-like"
    description = "generic fallback for Llama-layout decoders"

    ATTN, MLP = "self_attn", "mlp"
    Q, K, V, O = "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"
    GATE, UP, DOWN = "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"
    NORM1, NORM2 = "input_layernorm", "post_attention_layernorm"

    def __init__(self, model: nn.Module, announce: bool = False) -> None:
        super().__init__(model)
        layers = getattr(self._base(), "layers", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            raise ValueError(f"{type(self.model).__name__} has no decoder layers at "
                             "model.layers; register an architecture adapter for it")
        present = dict(layers[0].named_modules(remove_duplicate=False))
        missing = [n for n in self.linear_names() + [self.NORM1, self.NORM2] if n not in present]
        if missing:
            raise ValueError(f"decoder layer of {type(self.model).__name__} lacks "
                             f"{', '.join(missing)}; register an architecture adapter for it")
        if announce:
            log.warning("no architecture adapter registered for model_type %r: assuming the "
                        "Llama layout (model.layers[i].self_attn.{q,k,v,o}_proj, "
                        "mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm)",
                        getattr(self.config, "model_type", "?"))

    def _base(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    def decoder_layers(self) -> nn.ModuleList:
        return self._base().layers

    def layer_prefix(self, index: int) -> str:
        base = "model.layers" if hasattr(self.model, "model") else "layers"
        return f"{base}.{index}"

    def sequential_groups(self) -> list[list[str]]:
        return [[self.K, self.V, self.Q], [self.O], [self.UP, self.GATE], [self.DOWN]]

    def smooth_groups(self, layer: nn.Module) -> list[LinearGroup]:
        groups = [LinearGroup(prev=self.NORM1, linears=(self.Q, self.K, self.V),
                              block=self.ATTN, kind="norm")]
        v, o = layer.get_submodule(self.V), layer.get_submodule(self.O)
        if v.weight.shape == o.weight.shape:
            groups.append(LinearGroup(prev=self.V, linears=(self.O,), block=self.O, kind="linear"))
        else:
            log.debug("v_proj %s and o_proj %s differ in shape (grouped-query attention): "
                      "skipping the v -> o group", tuple(v.weight.shape), tuple(o.weight.shape))
        return [*groups, LinearGroup(prev=self.NORM2, linears=(self.GATE, self.UP),
                                     block=self.MLP, kind="norm"),
                LinearGroup(prev=self.UP, linears=(self.DOWN,), block=self.DOWN, kind="linear")]

    def roles(self) -> LayerRoles:
        return LayerRoles(attention=self.ATTN, mlp=self.MLP, q=self.Q, k=self.K, v=self.V,
                          o=self.O, gate=self.GATE, up=self.UP, down=self.DOWN,
                          attention_norm=self.NORM1, mlp_norm=self.NORM2, pre_norm_residual=True,
                          shared_inputs=((self.Q, self.K, self.V), (self.GATE, self.UP)),
                          info=self.attention_info())

    def attention_info(self) -> AttentionInfo:
        c = self.config
        heads = c.num_attention_heads
        return AttentionInfo(hidden_size=c.hidden_size, num_heads=heads,
                             num_kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                             head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads)


def resolve_adapter(model: nn.Module, adapters: dict[str, type[ArchitectureAdapter]]
                    ) -> ArchitectureAdapter:
    """The registered adapter for the model's ``model_type``, else the generic fallback."""
    model_type = getattr(model.config, "model_type", None)
    for cls in adapters.values():
        if model_type in cls.model_types:
            return cls(model)
    return LlamaLikeAdapter(model, announce=True)
