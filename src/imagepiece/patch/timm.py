"""The one place that knows timm's ``VisionTransformer``.

:func:`patch` swaps the model's class for a subclass whose forward runs each block as
attention (fused ``scaled_dot_product_attention``) → residual → the plan's operation for that
block → MLP, carrying token sizes (and, on request, source maps and centroids) alongside the
tokens. Weights, parameter names and the state dict are untouched, so :func:`unpatch` (or a
plan that reduces nothing) gives back the original model exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .. import ops
from ..plan import ReductionPlan, Step, make_plan

__all__ = ["BlockTrace", "Controller", "is_patched", "patch", "supported_models", "unpatch"]

SUPPORTED = (
    "timm VisionTransformer and VisionTransformerDistilled built from the standard Block and "
    "Attention (ViT, DeiT, distilled DeiT, DeiT3/LayerScale, register tokens, qk-norm, "
    "class-token or avg/avgmax/max pooling, fixed or dynamic image size)"
)


def supported_models() -> str:
    """Human-readable description of the architectures :func:`patch` accepts."""
    return SUPPORTED


@dataclass
class BlockTrace:
    """What one block did during the last forward pass (``tokens`` include prefix tokens).

    ``size`` is ``None`` while every token still stands for one patch. ``source`` (0/1,
    ``(B, N_out, patches)``), ``scores`` (class attention of the patch tokens entering the
    operation, ``(B, N_in - prefix)``) and ``patch_scores`` (those scores spread onto the
    patches, ``(B, patches)``) are filled only when tracing asks for them.
    """

    block: int
    kind: str
    tokens_in: int
    tokens_out: int
    size: torch.Tensor | None
    source: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    patch_scores: torch.Tensor | None = None
    merged_similarity: torch.Tensor | None = None
    fused: bool = False  # the last output token is EViT's fused token


class Controller:
    """``model.imagepiece``: the plan of a patched model, its resolved steps and the trace.

    Not an ``nn.Module``, so the model's state dict is unchanged by patching.
    """

    def __init__(self, plan: ReductionPlan, depth: int, num_prefix: int, has_class_token: bool):
        self.depth = depth
        self.num_prefix = num_prefix
        self.has_class_token = has_class_token
        self.trace_sources = False
        self.trace_scores = False
        self.trace: list[BlockTrace] = []
        self.last_size: torch.Tensor | None = None  # sizes out of the last forward_features
        self.last_tokens: int | None = None  # tokens out of the last forward pass
        self._cache: dict[int, tuple[Step, ...]] = {}
        self.plan = plan

    @property
    def plan(self) -> ReductionPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: ReductionPlan | str) -> None:
        plan = make_plan(plan, self.depth)
        self._cache = {}
        self._plan = plan
        # Resolve once for a typical size so bad plans fail now, not at the first forward.
        self.steps(self.num_prefix + 4 * 4)

    def steps(self, num_tokens: int) -> tuple[Step, ...]:
        """Resolved per-block steps for an input of ``num_tokens`` tokens (cached)."""
        steps = self._cache.get(num_tokens)
        if steps is None:
            steps = self._plan.resolve(self.depth, num_tokens, self.num_prefix)
            self._cache[num_tokens] = steps
        return steps

    def token_counts(self, num_tokens: int) -> list[tuple[int, int]]:
        """(tokens entering, tokens leaving) each block, prefix tokens included."""
        return [(s.tokens_in, s.tokens_out) for s in self.steps(num_tokens)]

    def record(self, sources: bool = False, scores: bool = False) -> Controller:
        """Choose what the trace keeps beyond token counts and sizes (costs memory/time)."""
        self.trace_sources = sources
        self.trace_scores = scores
        return self

    def __repr__(self) -> str:
        return f"Controller(plan={self._plan.name!r}, depth={self.depth}, prefix={self.num_prefix})"


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "imagepiece", None), Controller)


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
    """Apply a reduction plan to a timm ViT in place and return it.

    ``plan`` is a preset name (``"tome"``, ``"evit"``, ``"imagepiece"``, ``"imagepiece+tome"``,
    ``"imagepiece-discard"``, ``"none"``) with its knobs, or a :class:`ReductionPlan`.
    Patching a patched model only replaces its plan.
    """
    if is_patched(model):
        model.imagepiece.plan = make_plan(plan, model.imagepiece.depth, **knobs)
        return model
    _check_supported(model)
    depth = len(model.blocks)
    ctl = Controller(
        make_plan(plan, depth, **knobs),
        depth=depth,
        num_prefix=model.num_prefix_tokens,
        has_class_token=model.cls_token is not None,
    )
    original = type(model)
    model.__class__ = _reduced_class(original)
    model._imagepiece_original_class = original
    model.imagepiece = ctl
    return model


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original class; the model behaves exactly as before patching."""
    if is_patched(model):
        model.__class__ = model._imagepiece_original_class
        del model._imagepiece_original_class
        del model.imagepiece
    return model


_CLASSES: dict[type, type] = {}


def _reduced_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        cls = type(f"Reduced{base.__name__}", (_ReducedViT, base), {})
        _CLASSES[base] = cls
    return cls


# --------------------------------------------------------------------------------------
# Forward pass
# --------------------------------------------------------------------------------------


@dataclass
class _State:
    """Per-token tensors that travel with the tokens through one forward pass."""

    size: torch.Tensor | None  # (B, N) float32; None = all ones
    pos: torch.Tensor | None  # (B, N, 2) grid centroids, when locality or tracing needs them
    source: torch.Tensor | None  # (B, N, patches), when tracing asks
    # Sizes as proportional attention sees them, where they differ from ``size``: with
    # ``fused_bias=False`` EViT's fused token counts as one token there (None = ``size``).
    bias_size: torch.Tensor | None = None

    @property
    def attn_size(self) -> torch.Tensor | None:
        return self.size if self.bias_size is None else self.bias_size


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


def _merge_state(index: ops.MergeIndex, x: torch.Tensor, st: _State) -> tuple[torch.Tensor, _State]:
    pos = None
    if st.pos is not None:
        pos, _ = ops.merge_weighted(index, st.pos, st.size)
    x, size = ops.merge_weighted(index, x, st.size)
    source = None if st.source is None else ops.apply_merge(index, st.source, "amax")
    bias_size = None
    if st.bias_size is not None:
        bias_size = ops.apply_merge(index, st.bias_size.unsqueeze(-1)).squeeze(-1)
    return x, _State(size, pos, source, bias_size)


def _prune_bias_size(index: ops.SelectIndex, st: _State, fuse: bool, fused_bias: bool):
    """Attention sizes after a prune: the fused token enters attention as one token unless
    ``fused_bias``; kept tokens keep theirs."""
    if st.bias_size is None and (fused_bias or not fuse):
        return None
    base = st.attn_size
    if base is None:
        base = torch.ones(index.keep.shape[0], index.keep.shape[1] + index.dropped.shape[1],
                          device=index.keep.device)
    kept = ops.apply_select(index, base.unsqueeze(-1)).squeeze(-1)
    if not fuse:
        return kept
    fused = ops.apply_select(index, base.unsqueeze(-1), "sum")[:, -1:, 0]
    return torch.cat([kept, torch.ones_like(fused) if not fused_bias else fused], dim=1)


def _prune_state(
    index: ops.SelectIndex, x: torch.Tensor, st: _State, fuse: bool, fused_bias: bool = True
) -> tuple[torch.Tensor, _State]:
    bias_size = _prune_bias_size(index, st, fuse, fused_bias)
    x = ops.apply_select(index, x, "weighted" if fuse else None)
    size, pos, source = st.size, st.pos, st.source
    if size is not None or fuse:
        if size is None:
            size = x.new_ones((x.shape[0], index.keep.shape[1] + index.dropped.shape[1]),
                              dtype=torch.float32)
        w = size.unsqueeze(-1)
        if pos is not None:
            pos = ops.apply_select(index, pos * w, "sum" if fuse else None)
        size = ops.apply_select(index, w, "sum" if fuse else None)
        if pos is not None:
            pos = pos / size
        size = size.squeeze(-1)
    elif pos is not None:
        pos = ops.apply_select(index, pos)
    if source is not None:
        source = ops.apply_select(index, source, "amax" if fuse else None)
    return x, _State(size, pos, source, bias_size)


class _ReducedViT:
    """Mixin placed before the timm class by :func:`patch`."""

    imagepiece: Controller

    def forward_features(self, x: torch.Tensor, **kwargs) -> torch.Tensor:
        return self._imagepiece_features(x, **kwargs)[0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False, size=None) -> torch.Tensor:
        if self.global_pool not in ("avg", "avgmax"):
            return super().forward_head(x, pre_logits=pre_logits)
        if size is None:
            size = _sizes_for(self.imagepiece, x)
        if size is None:
            return super().forward_head(x, pre_logits=pre_logits)
        tokens = x[:, self.num_prefix_tokens:]
        size = size[:, self.num_prefix_tokens:]
        pooled = ops.size_weighted_mean(tokens, size)
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

    def __reduce_ex__(self, protocol):
        # The patched class is made at run time and cannot be found by name: pickle the
        # original class and re-apply the patch on load.
        return _unpickle_patched, (self._imagepiece_original_class,), self.__dict__

    def _imagepiece_features(self, x: torch.Tensor, attn_mask=None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise ValueError("attention masks are not supported on a token-reduced model")
        ctl = self.imagepiece
        _check_image_size(self, x)
        x = self.patch_embed(x)
        grid = tuple(x.shape[1:3]) if x.ndim == 4 else tuple(self.patch_embed.grid_size)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)

        steps = ctl.steps(x.shape[1])
        P = ctl.num_prefix
        tracing = not torch.compiler.is_compiling()
        want_sources = tracing and ctl.trace_sources
        want_scores = tracing and ctl.trace_scores
        need_pos = want_sources or any(s.kind == "retokenize" and s.locality for s in steps)
        B = x.shape[0]
        st = _State(
            size=None,
            pos=ops.initial_positions(B, P, grid, x.device, torch.float32) if need_pos else None,
            source=(ops.initial_sources(B, P, grid[0] * grid[1], x.device, torch.float32)
                    if want_sources else None),
        )
        trace: list[BlockTrace] = []
        extent = float(max(grid))
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i, (blk, step) in enumerate(zip(self.blocks, steps, strict=True)):
            if checkpointing:
                x, st, rec = checkpoint(_block_forward, blk, x, st, step, ctl, extent, want_scores,
                                        use_reentrant=False)
            else:
                x, st, rec = _block_forward(blk, x, st, step, ctl, extent, want_scores)
            if tracing:
                rec.block = i
                trace.append(rec)
        if tracing:
            # timm's two-step API (forward_head(forward_features(x))) has no place for sizes:
            # keep them so the head pools exactly as model(x) does.
            ctl.trace, ctl.last_size, ctl.last_tokens = trace, st.size, x.shape[1]
        x = self.norm(x)
        return x, st.size


def _unpickle_patched(base: type) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = _reduced_class(base)
    return obj


def _sizes_for(ctl: Controller, x: torch.Tensor) -> torch.Tensor | None:
    """Sizes of the tokens ``x`` for size-weighted pooling: those of the last
    ``forward_features`` when they fit ``x``; None when every token is one patch."""
    size = ctl.last_size
    if size is not None and tuple(size.shape) == tuple(x.shape[:2]):
        return size
    if size is None and ctl.last_tokens in (None, x.shape[1]):
        return None
    raise ValueError(
        f"forward_head got {x.shape[1]} tokens whose sizes are unknown; on a token-reduced "
        "model call forward_head(forward_features(x)) with the same x, or model(x)"
    )


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


def _block_forward(blk, x: torch.Tensor, st: _State, step: Step, ctl: Controller,
                   extent: float, want_scores: bool):
    P = ctl.num_prefix
    plan = ctl.plan
    fast = step.kind == "none" and not want_scores and (st.size is None or not plan.prop_attn)
    if fast:
        # Unreduced block with unit sizes: timm's own forward, bit-for-bit.
        x = blk(x)
        return x, st, BlockTrace(0, "none", step.tokens_in, step.tokens_out, st.size, st.source)

    attn_size = st.attn_size
    bias = ops.proportional_bias(attn_size) if plan.prop_attn and attn_size is not None else None
    out, q, k = _attention(blk.attn, blk.norm1(x), bias)
    x = x + blk.drop_path1(blk.ls1(out))

    scores = None
    if step.needs_scores or want_scores:
        scores = ops.class_attention(q, k, blk.attn.scale, P, ctl.has_class_token, bias)
    # The trace holds detached tensors only, so it never keeps an autograd graph alive.
    rec = BlockTrace(0, step.kind, step.tokens_in, step.tokens_out, None,
                     scores=scores.detach() if want_scores else None)
    if want_scores and st.source is not None:
        rec.patch_scores = torch.einsum("bn,bnp->bp", scores.detach(), st.source[:, P:])
    rank = scores
    if step.size_norm and st.size is not None:
        rank = scores / st.size[:, P:]

    if step.kind == "merge":
        index = ops.bipartite_matching(k.mean(dim=1), step.r, P)
        x, st = _merge_state(index, x, st)
        rec.merged_similarity = index.similarity.detach()
    elif step.kind == "retokenize":
        index = ops.retokenize_matching(
            k.mean(dim=1), rank, P, step.m, step.r, st.pos, step.locality, extent, step.pairs_only
        )
        x, st = _merge_state(index, x, st)
        rec.merged_similarity = index.similarity.detach()
    elif step.kind == "prune":
        index = ops.prune_select(rank, P, step.k, weights=scores)
        x, st = _prune_state(index, x, st, step.fuse, plan.fused_bias)
        rec.fused = step.fuse

    x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    rec.size, rec.source = st.size, st.source
    return x, st, rec
