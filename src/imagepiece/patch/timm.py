"""The one place that knows timm's ``VisionTransformer``.

:func:`patch` swaps the model's class for a subclass whose forward embeds the image as timm
does, runs the blocks through :func:`imagepiece.runtime.run_blocks` (attention with the fused
kernel → residual → the plan's operation → MLP) and pools as timm does, by size where timm
averages. This module only says how a timm block computes attention and is laid out. Weights,
parameter names and the state dict are untouched, so :func:`unpatch` (or a plan that reduces
nothing) gives back the original model exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops, versions
from ..plan import ReductionPlan, make_plan
from ..runtime import (
    BlockTrace,
    Controller,
    ModelInfo,
    ReducedModule,
    cut_blocks,
    is_patched,
    last_sizes,
    run_blocks,
    swap_class,
    unpatch,
)

__all__ = ["BlockTrace", "Controller", "describe", "is_patched", "limit_forward", "patch",
           "supported_models", "unpatch"]

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled built from the standard Block and "
    "Attention (ViT, DeiT, distilled DeiT, DeiT3/LayerScale, register tokens, qk-norm, "
    "class-token or avg/avgmax/max pooling, fixed or dynamic image size)"
)


def supported_models() -> str:
    """Human-readable description of the architectures :func:`patch` accepts."""
    return SUPPORTED


def is_timm_vit(model: nn.Module) -> bool:
    from timm.models.vision_transformer import VisionTransformer

    return isinstance(model, VisionTransformer)


def _check_supported(model: nn.Module) -> None:
    from timm.models.vision_transformer import Attention, Block, VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"{type(model).__name__} is not supported; supported: {SUPPORTED}")
    for i, blk in enumerate(model.blocks):
        attn = getattr(blk, "attn", None)
        if type(blk) is not Block or type(attn) is not Attention:
            raise TypeError(
                f"block {i} is {type(blk).__name__} with {type(attn).__name__} attention; "
                f"supported: {SUPPORTED}"
            )
    if getattr(model, "attn_pool", None) is not None:
        raise TypeError(f"attention-pool heads ('map') are not supported; supported: {SUPPORTED}")
    if model.global_pool not in ("token", "avg", "avgmax", "max", ""):
        raise TypeError(f"global_pool={model.global_pool!r} is not supported; supported: {SUPPORTED}")
    if getattr(model, "pool_include_prefix", False):
        raise TypeError(f"pool_include_prefix=True is not supported; supported: {SUPPORTED}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise TypeError("patch dropout changes token counts at random and cannot be combined with "
                        f"a reduction plan; supported: {SUPPORTED}")


def patch(model: nn.Module, plan: str | ReductionPlan | None = "imagepiece", **knobs: Any) -> nn.Module:
    """Apply a reduction plan to an unpatched timm ViT in place and return it.

    ``plan`` is a preset name (``"tome"``, ``"evit"``, ``"imagepiece"``, ``"imagepiece+tome"``,
    ``"imagepiece-discard"``, ``"none"``) with its knobs, or a :class:`ReductionPlan`.
    ``UnsupportedVersionError`` when the installed timm is outside the supported range.
    """
    import timm

    versions.check("timm", timm.__version__)
    _check_supported(model)
    depth = len(model.blocks)
    ctl = Controller(make_plan(plan, depth, **knobs), depth=depth, num_prefix=model.num_prefix_tokens,
                     has_class_token=model.cls_token is not None, family="timm")
    swap_class(model, _ReducedViT)
    model.imagepiece = ctl
    return model


# --------------------------------------------------------------------------------------
# How a timm block computes attention and is laid out
# --------------------------------------------------------------------------------------


def _attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
    """timm ``Attention`` with the fused kernel, returning q and k for scores and metrics."""
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    out = F.scaled_dot_product_attention(
        q, k, v,
        attn_mask=None if bias is None else bias.to(q.dtype),
        dropout_p=attn.attn_drop.p if attn.training else 0.0,
    )
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), q, k


class _TimmLayout:
    """timm's ``Block``: ``x + drop_path(ls(attn(norm1(x))))``, then the same for the MLP."""

    def attend(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None):
        out, q, k = _attention(blk.attn, blk.norm1(x), bias)
        return x + blk.drop_path1(blk.ls1(out)), q, k

    def mlp(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))

    def whole(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return blk(x)

    def scale(self, blk: nn.Module) -> float:
        return blk.attn.scale


_LAYOUT = _TimmLayout()


# --------------------------------------------------------------------------------------
# The model: embedding and head as timm, blocks through the runtime
# --------------------------------------------------------------------------------------


def _embed(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """timm's embedding steps; returns the tokens entering block 0 and the patch grid."""
    _check_image_size(model, x)
    x = model.patch_embed(x)
    grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(model.patch_embed.grid_size)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    return model.norm_pre(x), grid


def _checkpointing(model: nn.Module) -> bool:
    return model.grad_checkpointing and model.training and torch.is_grad_enabled()


class _ReducedViT(ReducedModule):
    """Mixin placed before the timm class by :func:`patch`."""

    imagepiece: Controller

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._imagepiece_features(x, **kwargs)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size=None) -> torch.Tensor:
        if self.global_pool not in ("avg", "avgmax"):
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None:
            # timm's two-step API (forward_head(forward_features(x))) has no place for sizes
            size = last_sizes(self.imagepiece, x)
        if size is None:
            return super().forward_head(x, pre_logits=pre_logits)
        tokens = x[:, self.num_prefix_tokens:]
        pooled = ops.size_weighted_mean(tokens, size[:, self.num_prefix_tokens:])
        if self.global_pool == "avgmax":
            pooled = 0.5 * (pooled + tokens.amax(dim=1))
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        x, size = self._imagepiece_features(x, **kwargs)
        return self.forward_head(x, size=size)

    def forward_intermediates(self, *args, **kwargs):
        if not self.imagepiece.plan.is_identity:
            raise ValueError(
                f"forward_intermediates is not available under the reducing plan "
                f"{self.imagepiece.plan.name!r}: token counts change between blocks; use "
                "model.imagepiece.record(...) and model.imagepiece.trace, or plan='none'"
            )
        return super().forward_intermediates(*args, **kwargs)

    def _imagepiece_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported on a token-reduced model")
        x, grid = _embed(self, x)
        x, size = run_blocks(_LAYOUT, self.blocks, x, grid, self.imagepiece, _checkpointing(self))
        return self.norm(x), size


def limit_forward(model: nn.Module, x: torch.Tensor, tokens: Sequence[tuple[int, int]]) -> torch.Tensor:
    """An unpatched timm ViT run with its blocks on sequences cut to ``tokens``: a plan's limit."""
    x, _ = _embed(model, x)
    x = cut_blocks(_LAYOUT, model.blocks, x, tokens, _checkpointing(model))
    return model.forward_head(model.norm(x))


def describe(model: nn.Module) -> ModelInfo:
    """Depth, native input size and token count of a timm ViT (for the tools)."""
    pe = model.patch_embed
    return ModelInfo(len(model.blocks), tuple(pe.img_size), getattr(pe.proj, "in_channels", 3),
                     pe.num_patches + model.num_prefix_tokens, tuple(pe.patch_size))


def _check_image_size(model, x: torch.Tensor) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected images shaped (B, C, H, W), got shape {tuple(x.shape)}")
    pe = model.patch_embed
    h, w = x.shape[-2:]
    if getattr(model, "dynamic_img_size", False) or getattr(pe, "dynamic_img_pad", False):
        ph, pw = pe.patch_size
        if not getattr(pe, "dynamic_img_pad", False) and (h % ph or w % pw):
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        return
    if getattr(pe, "strict_img_size", True) and (h, w) != tuple(pe.img_size):
        raise ValueError(
            f"image size {h}x{w} does not match the model's {pe.img_size[0]}x{pe.img_size[1]}; "
            "create the model with img_size=... or dynamic_img_size=True"
        )
