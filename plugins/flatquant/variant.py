"""Which FlatQuant a run trains: the paper's, or msModelSlim's (``ascend=true``).

:func:`variant_for` picks one from the config, once; the learnables, the training step,
the folding and the quantizer ask it wherever the two differ.

* :class:`Variant`, the paper's (ruikangliu/FlatQuant): a head transform ``P_o`` and a
  value transform ``P_v`` for o_proj, two learned activation clip factors per linear
  (min and max side) applied by the online transform's clamp.
* :class:`AscendVariant`, msModelSlim's W4A4_FLATQUANT_DYNAMIC (what vllm-ascend runs;
  export with ``--format ascendv1``): int4 activations per token, symmetric over the signed
  range and scaled by ``sigmoid(clip) x max|x| / 7`` with one learned ratio per fused input
  (q/k/v share one, gate/up one) that becomes the activation quantizer's ``clip_ratio``;
  no head/value transform (o_proj's online transform is the identity).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from torch import nn

from qcore.interfaces import UnsupportedScheme
from qcore.schemes import QuantArgs, QuantScheme

if TYPE_CHECKING:
    from qcore_flatquant.config import FlatQuantConfig
    from qcore_flatquant.learnables import LayerTransforms


class Variant:
    """The paper's FlatQuant."""

    #: learn P_o and P_v (without them o_proj's online transform is the identity)
    head_transforms: bool = True
    #: the training fake quantizer clamps symmetric activations to the clipped magnitude
    #: first, as the deployed online transform does (see ``fake_quant_tokens_ste``)
    clamp_tokens: bool = True

    def scheme(self, scheme: QuantScheme) -> QuantScheme:
        """The scheme the run quantizes to."""
        return scheme

    def check_scheme(self, scheme: QuantScheme) -> None:
        """Raise :class:`UnsupportedScheme` for a scheme this variant cannot produce (before
        flatquant's own checks)."""

    def clip_owner(self, names: dict[str, str], role: str, name: str) -> str:
        """The linear whose activation clip linear ``name`` (of ``role``) uses."""
        return name

    def act_clip(self, min_logit: torch.Tensor, max_logit: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (min, max) clip factors of a clip owner's logits."""
        return torch.sigmoid(min_logit), torch.sigmoid(max_logit)

    def act_clip_parameters(self, max_logits: list[nn.Parameter],
                            min_logits: list[nn.Parameter]) -> list[nn.Parameter]:
        """The activation clip logits that train, of the clip owners' max and min sides."""
        return max_logits + min_logits

    def transform_clip(self, act: QuantArgs) -> Literal["none", "sym", "asym"]:
        """The clamp of each folded linear's online transform (the learned activation
        clip), for the scheme's activations."""
        return "sym" if act.symmetric else "asym"

    def activations(self, owner: LayerTransforms, act: QuantArgs
                    ) -> dict[str, QuantArgs | None]:
        """Each linear's activation quantizer: the scheme's."""
        return dict.fromkeys(owner.names.values(), act)


class AscendVariant(Variant):
    """msModelSlim's FlatQuant, the one vllm-ascend runs."""

    head_transforms = False  # vllm-ascend has no head transform to load
    clamp_tokens = False  # codes saturate at [-2^(b-1), 2^(b-1) - 1], as the NPU's

    def scheme(self, scheme: QuantScheme) -> QuantScheme:
        """Activations symmetric with the signed range, as the NPU's; named ``-ascend``."""
        act = scheme.activations.model_copy(update={"symmetric": True,
                                                    "symmetric_range": "signed"})
        return scheme.model_copy(update={
            "name": f"{scheme.name}-ascend", "activations": QuantArgs.model_validate(
                act.model_dump())})

    def check_scheme(self, scheme: QuantScheme) -> None:
        w, act = scheme.weights, scheme.activations
        if (act is None or act.bits != 4 or w.bits != 4 or not w.symmetric
                or w.granularity != "channel" or scheme.kv_cache is not None):
            raise UnsupportedScheme(
                f"flatquant ascend=true writes msModelSlim's W4A4_FLATQUANT_DYNAMIC: int4 "
                f"symmetric per-channel weights, int4 per-token activations and no KV-cache "
                f"quantization; scheme {scheme.name} has weights {w.describe()}, "
                f"activations {act.describe() if act else 'none'}"
                f"{', a quantized KV cache' if scheme.kv_cache else ''} (use --scheme W4A4)")

    def clip_owner(self, names: dict[str, str], role: str, name: str) -> str:
        """The first of the linears fed the same input: vllm-ascend fuses q/k/v and gate/up
        and keeps one ratio for each fused layer."""
        return names["q"] if role in ("q", "k", "v") else \
            names["gate"] if role in ("gate", "up") else name

    def act_clip(self, min_logit: torch.Tensor, max_logit: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """One ratio on both ends (msModelSlim's): the max side's."""
        ratio = torch.sigmoid(max_logit)
        return ratio, ratio

    def act_clip_parameters(self, max_logits: list[nn.Parameter],
                            min_logits: list[nn.Parameter]) -> list[nn.Parameter]:
        return max_logits  # one ratio per fused input

    def transform_clip(self, act: QuantArgs) -> Literal["none", "sym", "asym"]:
        """None: the clip is the activation quantizer's ``clip_ratio``."""
        return "none"

    def activations(self, owner: LayerTransforms, act: QuantArgs
                    ) -> dict[str, QuantArgs | None]:
        """The scheme's, with the learned clip as its ``clip_ratio`` (a float32 value: what
        the export's float32 ``clip_ratio`` tensor holds)."""
        out: dict[str, QuantArgs | None] = {}
        for name in owner.names.values():
            ratio = float(owner.act_clip(name)[1].detach().float().cpu())
            out[name] = act.model_copy(update={"clip_ratio": ratio})
        return out


def variant_for(config: FlatQuantConfig) -> Variant:
    """The variant the config asks for (``ascend``)."""
    return AscendVariant() if config.ascend else Variant()
