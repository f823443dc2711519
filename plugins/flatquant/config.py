"""The options of the flatquant method (``--set name=value``), validated by pydantic.

``ascend`` picks the variant that runs (:mod:`qcore_flatquant.variant`); the options only
read after training (``fuse``, ``matrices``, ``weight_method``, ``weight_options``) are
those a saved matrices file may differ in (:mod:`qcore_flatquant.matrices`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class FlatQuantConfig(BaseModel):
    """Options of the flatquant method (defaults: the FlatQuant authors' scripts)."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(default=15, ge=0, description="training epochs per decoder layer")
    batch_size: int = Field(default=4, gt=0, description="calibration windows per step")
    lr: float = Field(default=5e-3, gt=0, description="AdamW learning rate of the transforms "
                                                      "and per-channel scales")
    clip_lr_multiplier: float = Field(default=10.0, gt=0, description="clipping factors learn "
                                                                      "at lr x this")
    weight_decay: float = Field(default=0.01, ge=0, description="AdamW weight decay (the "
                                "reference builds AdamW with torch's default, 0.01)")
    min_lr_ratio: float = Field(default=1e-3, gt=0, le=1, description="cosine schedule ends "
                                "at lr x this")
    add_diag: bool = Field(default=True, description="learn per-channel scales c (x diag(c))")
    diag_alpha: float = Field(default=0.3, ge=0, le=1, description="SmoothQuant-style init "
                              "c = max|W_col|^(1-alpha) / max|X|^alpha")
    lwc: bool = Field(default=True, description="learnable weight clipping (per output row)")
    lac: bool = Field(default=True, description="learnable activation clipping (per linear)")
    clip_init: float = Field(default=4.0, description="initial logit of every clipping "
                             "factor (sigmoid(4) = 0.982)")
    train_transforms: bool = Field(default=True, description="learn the transform matrices "
                                   "(False keeps their random orthogonal init)")
    init: Literal["random_orthogonal", "identity"] = Field(
        default="random_orthogonal", description="initial transform matrices")
    key_transform: bool = Field(default=True, description="learn the key-cache transform "
                                "P_k when the scheme quantizes the KV cache")
    normalize_loss: bool = Field(default=True, description="optimise MSE / MSE.detach() "
                                 "as the reference does (same direction, unit scale)")
    train_dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="autocast dtype of the training forward")
    seed: int = Field(default=0, description="seed of the random orthogonal inits "
                      "(layer i uses seed + i)")
    ascend: bool = Field(
        default=False, description="msModelSlim's W4A4_FLATQUANT_DYNAMIC, the FlatQuant "
        "variant vllm-ascend runs (export with --format ascendv1): activations per token "
        "symmetric, scaled by sigmoid(clip) x max|x| / 7 with one learned clip ratio per "
        "fused input (q/k/v share one, gate/up one), and no head/value transform for "
        "o_proj (its transform is the identity)")
    fuse: bool | None = Field(
        default=None, description="fuse the training step's fake quantizers and weight "
        "clipping with torch.compile (inductor; a C++ compiler on CPU): the same maths in a "
        "few kernels instead of dozens of elementwise passes. None: on where the layer "
        "trains on the CPU, off elsewhere (eager PyTorch)")
    matrices: str | None = Field(
        default=None, description="a folder for each decoder layer's trained learnables "
        "(the reference's --save_matrix/--reload_matrix): a layer's file is written once it "
        "is trained and loaded instead of training when it is already there, so an "
        "interrupted calibration resumes at the first missing layer and gives what an "
        "uninterrupted one gives. A file trained for another model, calibration, scheme or "
        "training option is refused")
    weight_method: str = Field(
        default="rtn", description="registered weight solver that rounds the folded weights: "
        "'rtn' (round-to-nearest), 'gptq' (Hessians of the transformed, clipped, quantized "
        "inputs, true-sequential inside the layer), or any third-party solver")
    weight_options: dict[str, Any] = Field(
        default_factory=dict, description="options of the weight solver (its Config, e.g. "
        "{act_order: true, static_groups: true} for gptq)")
