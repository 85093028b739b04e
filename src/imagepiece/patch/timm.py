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

from .. import versions
from ..plan import ReductionPlan, make_plan
from ..runtime import (
    BlockTrace,
    Controller,
    ModelInfo,
    ReducedModule,
    RunOutput,
    Taps,
    cut_blocks,
    is_patched,
    pool_patches,
    run_blocks,
    sizes_of,
    swap_class,
    tag_sizes,
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
        run = self._imagepiece_features(x, **kwargs)
        return tag_sizes(run.x, run.size)  # for forward_head: the sizes travel with the features

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size=None) -> torch.Tensor:
        if self.global_pool not in ("avg", "avgmax"):
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None:
            # timm's two-step API (forward_head(forward_features(x))): the sizes are on x
            size = sizes_of(x, self.imagepiece)
        if size is None:
            return super().forward_head(x, pre_logits=pre_logits)
        pooled = pool_patches(x, size, self.num_prefix_tokens)
        if self.global_pool == "avgmax":
            pooled = 0.5 * (pooled + x[:, self.num_prefix_tokens:].amax(dim=1))
        pooled = self.head_drop(self.fc_norm(pooled))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, **kwargs))

    def forward_intermediates(self, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False, output_dict: bool = False,
                              attn_mask=None, is_causal: bool = False, pruned: str = "fused"):
        """timm's ``forward_intermediates`` under any plan: each requested block's patch tokens
        unmerged to the full grid (a merged group's feature on every member patch; ``pruned``
        as in :class:`imagepiece.runtime.Taps`), shaped as timm documents; prefix tokens as timm
        returns them. The final features carry their sizes for ``forward_head``."""
        if (attn_mask is not None or is_causal) and self.imagepiece.plan.is_identity:
            return super().forward_intermediates(
                x, indices, return_prefix_tokens, norm, stop_early, output_fmt, intermediates_only,
                output_dict, attn_mask, is_causal)
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt={output_fmt!r} is not allowed; expected 'NCHW' or 'NLC'")
        from timm.models._features import feature_take_indices

        take, last = feature_take_indices(len(self.blocks), indices)
        taps = Taps(frozenset(take), pruned, last if stop_early else None)
        run = self._imagepiece_features(x, attn_mask, is_causal, taps)
        P = self.num_prefix_tokens
        pairs = [t.unmerge(P, self.norm if norm else None) for t in run.taps]
        inter = [g for _, g in pairs]
        if output_fmt == "NCHW":
            (h, w), B = run.grid, x.shape[0]
            inter = [g.reshape(B, h, w, -1).permute(0, 3, 1, 2).contiguous() for g in inter]
        prefix = [p for p, _ in pairs] if P else None
        if output_dict:
            out = {"image_intermediates": inter}
            if prefix is not None and return_prefix_tokens:
                out["image_intermediates_prefix"] = prefix
            if not intermediates_only:
                out["image_features"] = tag_sizes(run.x, run.size)
            return out
        if return_prefix_tokens and prefix is not None:
            inter = list(zip(inter, prefix, strict=True))
        return inter if intermediates_only else (tag_sizes(run.x, run.size), inter)

    def _imagepiece_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False,
                             taps: Taps | None = None) -> RunOutput:
        """Embedding, blocks and final norm; the output tokens are normalised, taps are not."""
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported on a token-reduced model")
        x, grid = _embed(self, x)
        run = run_blocks(_LAYOUT, self.blocks, x, grid, self.imagepiece, _checkpointing(self), taps)
        return run._replace(x=self.norm(run.x))


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
