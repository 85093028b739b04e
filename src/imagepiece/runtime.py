"""The family-agnostic runtime: what every patched model runs, whatever its family.

A family adapter (``patch/timm.py``, ``patch/hf.py``) says only how its blocks compute attention
and are laid out (a :class:`Layout`), how images become tokens and how tokens become outputs.
Everything a method does lives here, once: the per-token state (size, centroid, source), the
step that applies a block's planned operation between attention and MLP (:func:`run_blocks`),
the controller (``model.imagepiece``), the trace, size-weighted pooling and the class swap behind
``patch``/``unpatch``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from . import ops
from .plan import ReductionPlan, Step, make_plan, preset_knobs, split_spec

__all__ = [
    "BlockTrace",
    "Controller",
    "Layout",
    "ModelInfo",
    "is_patched",
    "original_class",
    "pool_patches",
    "restore_classes",
    "run_blocks",
    "split_spec",
    "swap_class",
    "ReducedModule",
    "Trace",
    "cut_blocks",
    "GridTap",
    "RunOutput",
    "Taps",
    "sizes_of",
    "tag_sizes",
    "unpatch",
]


# --------------------------------------------------------------------------------------
# Trace and controller
# --------------------------------------------------------------------------------------


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


class Trace(list):
    """``model.imagepiece.trace``: one :class:`BlockTrace` per block of the last forward pass.

    A list whose ``repr`` is a short table (operation, tokens in and out, range of token sizes
    per block) instead of every tensor; :meth:`full` or ``trace[i]`` give the tensors.
    """

    def full(self) -> str:
        """Every field of every block, tensors included (long)."""
        return "\n".join(repr(rec) for rec in self)

    def __repr__(self) -> str:
        if not self:
            return "Trace(empty: no forward pass recorded yet)"
        lines = [f"Trace of {len(self)} blocks (tokens include prefix tokens; sizes = patches per "
                 "token; .full() for the tensors)", "block  op          tokens     sizes"]
        for rec in self:
            size = rec.size
            sizes = "1" if size is None else f"{int(size.min())}-{int(size.max())}"
            fused = " (fused token)" if rec.fused else ""
            lines.append(f"{rec.block:5d}  {rec.kind:<10}  {rec.tokens_in:>4}->{rec.tokens_out:<4}"
                         f" {sizes}{fused}")
        return "\n".join(lines)


class Controller:
    """``model.imagepiece``: the plan of a patched model, its resolved steps and the trace.

    Not an ``nn.Module``, so the model's state dict is unchanged by patching. It holds no state
    that a later call reads back: what one forward pass produces (sizes, grid features) is
    returned with that call's outputs; the trace is a record for people, never an input.
    """

    def __init__(self, plan: ReductionPlan, depth: int, num_prefix: int, has_class_token: bool,
                 family: str = "timm"):
        self.depth = depth
        self.num_prefix = num_prefix
        self.has_class_token = has_class_token
        self.family = family
        self.trace_sources = False
        self.trace_scores = False
        self.trace = Trace()
        self._cache: dict[int, tuple[Step, ...]] = {}
        #: (preset, knobs) when the plan was made from a preset name or spec, else None
        self.preset: tuple[str, dict[str, Any]] | None = None
        self.plan = plan

    @property
    def plan(self) -> ReductionPlan:
        return self._plan

    @plan.setter
    def plan(self, plan: ReductionPlan | str) -> None:
        self.set_plan(plan)

    def set_plan(self, plan: ReductionPlan | str | None, **knobs: Any) -> None:
        """Replace the plan: a :class:`ReductionPlan`, a preset name with ``knobs``, or a method
        spec (``"tome:r=8"``, the CLI's syntax)."""
        name, knobs = split_spec(plan, knobs)
        made = make_plan(name, self.depth, **knobs)
        self._cache = {}
        self._plan = made
        self.preset = (name or "none", dict(knobs)) if not isinstance(name, ReductionPlan) else None
        # Resolve once for a typical size so bad plans fail now, not at the first forward.
        self.steps(self.num_prefix + 4 * 4)

    def knob(self, name: str) -> Any:
        """The value of knob ``name`` of the current preset plan (its default when not given);
        None when the plan has no such knob."""
        if self.preset is None:
            return None
        preset, knobs = self.preset
        return knobs.get(name, preset_knobs(preset).get(name))

    def set_knob(self, name: str, value: Any) -> None:
        """Re-make the current preset plan with knob ``name`` set to ``value`` (``model.r = 8``)."""
        if self.preset is None or name not in preset_knobs(self.preset[0]):
            current = self.preset[0] if self.preset else f"a custom {self._plan.name!r} ReductionPlan"
            raise AttributeError(
                f"cannot set {name}={value!r}: the plan is {current}, which has no {name!r} knob; set the "
                f"plan instead, e.g. model.imagepiece.plan = 'tome:{name}={value}'")
        preset, knobs = self.preset
        self.set_plan(preset, **{**knobs, name: value})

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
        return (f"Controller(plan={self._plan.name!r}, depth={self.depth}, prefix={self.num_prefix}, "
                f"family={self.family!r})")


class ModelInfo(NamedTuple):
    """What the tools need to know of a supported model, whatever its family."""

    depth: int
    image_size: tuple[int, int]
    in_chans: int
    num_tokens: int  # prefix + patch tokens at ``image_size``
    patch_size: tuple[int, int]


def is_patched(model: nn.Module) -> bool:
    return isinstance(getattr(model, "imagepiece", None), Controller)


# --------------------------------------------------------------------------------------
# Class swap: patching changes classes, never weights or parameter names
# --------------------------------------------------------------------------------------

_CLASSES: dict[tuple[type, type], type] = {}


class ReducedModule:
    """Base of every family's mixin: a patched module pickles (and deep-copies) as its original
    class with the patch re-applied on load, since the made-up class cannot be found by name.

    ``module.r`` is ToMe's idiom: reading it gives the plan's ``r`` (None for plans without
    one), setting it re-makes the plan with that ``r`` (``model.r = 4`` after
    ``patch(model, "tome", r=16)``), and raises ``AttributeError`` naming the supported way
    (``model.imagepiece.plan = "..."``) when the plan has no ``r`` knob.
    """

    @property
    def r(self) -> Any:
        return self.imagepiece.knob("r")

    @r.setter
    def r(self, value: Any) -> None:
        self.imagepiece.set_knob("r", value)

    def __reduce_ex__(self, protocol):
        return _unpickle_patched, (type(self).__bases__[0], self._imagepiece_original_class), self.__dict__

    def __prepare_scriptable__(self):
        # torch.jit.script calls this first: refuse in one line instead of a compiler error
        raise TypeError("TorchScript is not supported on a token-reduced model (plans resolve per "
                        "input size in Python); use torch.compile or ONNX export, or script the "
                        "model after imagepiece.unpatch(model)")


def _reduced_class(mixin: type, base: type) -> type:
    cls = _CLASSES.get((mixin, base))
    if cls is None:
        cls = type(f"Reduced{base.__name__}", (mixin, base), {})
        _CLASSES[(mixin, base)] = cls
    return cls


def _unpickle_patched(mixin: type, base: type) -> nn.Module:
    obj = base.__new__(base)
    obj.__class__ = _reduced_class(mixin, base)
    return obj


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of ``Reduced<Class>(mixin, Class)``, remembering the original."""
    base = type(module)
    module.__class__ = _reduced_class(mixin, base)
    module._imagepiece_original_class = base


def original_class(module: nn.Module) -> type:
    """The class ``module`` had before :func:`swap_class` (its own class when never swapped)."""
    return module.__dict__.get("_imagepiece_original_class", type(module))


def restore_classes(model: nn.Module) -> None:
    """Undo every :func:`swap_class` under ``model`` and drop the controllers."""
    for m in model.modules():
        original = m.__dict__.pop("_imagepiece_original_class", None)
        if original is not None:
            m.__class__ = original
        m.__dict__.pop("imagepiece", None)


# --------------------------------------------------------------------------------------
# What a family adapter provides
# --------------------------------------------------------------------------------------


class Layout(Protocol):
    """How one family's transformer block is laid out; everything else is shared.

    ``attend`` returns the residual stream after the attention branch (``x + branch(attn(norm(x)))``)
    with the heads' queries and keys ``(B, H, N, d)``, computed with the fused kernel and the
    additive ``bias`` (proportional attention, ``(B, 1, 1, N)``, or ``None``). ``mlp`` returns
    ``x + branch(mlp(norm(x)))``. ``whole`` is the family's own block forward, used bit-for-bit
    wherever a block reduces nothing. ``scale`` is the attention logit scale.
    """

    def attend(self, blk: nn.Module, x: torch.Tensor, bias: torch.Tensor | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def mlp(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def whole(self, blk: nn.Module, x: torch.Tensor) -> torch.Tensor: ...

    def scale(self, blk: nn.Module) -> float: ...


# --------------------------------------------------------------------------------------
# The per-token state and the block step
# --------------------------------------------------------------------------------------


PRUNED_MODES = ("fused", "last", "zeros")


@dataclass(frozen=True)
class Taps:
    """What a caller asks one forward pass to return besides its output: the outputs of
    ``blocks`` with the patch tokens unmerged to the full grid (:class:`GridTap`).

    ``pruned`` says what a patch whose token was dropped gets: ``"fused"`` (default) the feature
    of the token that holds it, EViT's fused token (zeros under a discard plan, where no token
    holds it); ``"last"`` the feature its token had when it was dropped (the residual stream
    after that block's attention); ``"zeros"`` zeros. ``stop`` runs no block after that index.
    """

    blocks: frozenset[int]
    pruned: str = "fused"
    stop: int | None = None

    def __post_init__(self):
        if self.pruned not in PRUNED_MODES:
            raise ValueError(f"pruned={self.pruned!r} is not allowed; expected one of {PRUNED_MODES}")


class GridTap(NamedTuple):
    """One block's output as a :class:`Taps` request returns it (detached from nothing: it is
    part of the computation, gradients flow through it)."""

    block: int
    tokens: torch.Tensor  # (B, N_i, C), prefix tokens first
    owner: torch.Tensor | None  # (B, patches): index of the token holding each patch, -1 none;
    #                             None: nothing was reduced yet, patch p is token prefix + p
    last: torch.Tensor | None  # (B, patches, C): features of dropped patches (pruned="last")

    def unmerge(self, num_prefix: int, norm: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(prefix tokens (B, P, C), patch features on the grid (B, patches, C))``, both after
        ``norm`` when given. With nothing reduced the patch tokens are returned as they are."""
        tokens = self.tokens if norm is None else norm(self.tokens)
        if self.owner is None:
            return tokens[:, :num_prefix], tokens[:, num_prefix:]
        fill = self.last if norm is None or self.last is None else norm(self.last)
        return tokens[:, :num_prefix], ops.unmerge(tokens, self.owner, fill)


class RunOutput(NamedTuple):
    """What :func:`run_blocks` returns: the tokens, their sizes (``None`` while all are 1), the
    grid taps asked for (empty without a :class:`Taps` request) and the patch grid (rows, cols)."""

    x: torch.Tensor
    size: torch.Tensor | None
    taps: list[GridTap]
    grid: tuple[int, int]


@dataclass
class _State:
    """Per-token tensors that travel with the tokens through one forward pass."""

    size: torch.Tensor | None  # (B, N) float32; None = all ones
    # (B, N, 2) sums of the grid positions of the patches each token holds (its centroid times
    # its size: merges and fusions just add them), when locality or tracing needs them
    pos: torch.Tensor | None
    source: torch.Tensor | None  # (B, N, patches), when tracing asks
    # Sizes as proportional attention sees them, where they differ from ``size``: with
    # ``fused_bias=False`` EViT's fused token counts as one token there (None = ``size``).
    bias_size: torch.Tensor | None = None
    # Only while grid taps are asked for on a reducing plan (see :class:`Taps`): the token
    # holding each patch (B, patches) long, -1 for none; the features dropped patches last had
    # (``pruned="last"``); the ``Taps.pruned`` rule.
    owner: torch.Tensor | None = None
    last: torch.Tensor | None = None
    pruned: str | None = None

    @property
    def attn_size(self) -> torch.Tensor | None:
        return self.size if self.bias_size is None else self.bias_size


def _merge_owner(index: ops.MergeIndex, owner: torch.Tensor, n: int) -> torch.Tensor:
    """Where each patch's token went in a merge of ``n`` tokens: kept and destination tokens to
    their new slots, merged-away sources to their destination's slot; -1 (unheld) stays -1."""
    rows = torch.cat([index.keep, index.dst], dim=1)
    new = torch.full((owner.shape[0], n + 1), -1, dtype=torch.long, device=owner.device)
    new.scatter_(1, rows, torch.arange(rows.shape[1], device=owner.device).expand_as(rows).contiguous())
    new.scatter_(1, index.src, index.dst_slot + index.keep.shape[1])
    return new.gather(1, torch.where(owner >= 0, owner, n))


def _prune_owner(index: ops.SelectIndex, x: torch.Tensor, st: _State, fuse: bool):
    """Owner and last features after a prune: kept tokens to their new slots; dropped ones to
    the fused token (rule ``"fused"`` with ``fuse``) or to -1, remembering their features."""
    B, n = x.shape[:2]
    owner = st.owner
    k = index.keep.shape[1]
    new = torch.full((B, n + 1), k if fuse and st.pruned == "fused" else -1, dtype=torch.long,
                     device=x.device)
    new[:, n] = -1  # patches no token held before stay unheld
    new.scatter_(1, index.keep, torch.arange(k, device=x.device).expand_as(index.keep).contiguous())
    out = new.gather(1, torch.where(owner >= 0, owner, n))
    last = st.last
    if st.pruned == "last":
        dropped_now = ((out < 0) & (owner >= 0)).unsqueeze(-1)
        before = ops.unmerge(x, owner)
        last = torch.where(dropped_now, before, torch.zeros_like(before) if last is None else last)
    return out, last


def _centroids(st: _State) -> torch.Tensor | None:
    """Grid centroids ``(B, N, 2)`` of the tokens (None when positions are not tracked)."""
    if st.pos is None or st.size is None:
        return st.pos
    return st.pos / st.size.unsqueeze(-1)


def _merge_state(index: ops.MergeIndex, x: torch.Tensor, st: _State) -> tuple[torch.Tensor, _State]:
    owner = None if st.owner is None else _merge_owner(index, st.owner, x.shape[1])
    pos = None if st.pos is None else ops.apply_merge(index, st.pos)  # sums add up
    x, size = ops.merge_weighted(index, x, st.size)
    source = None if st.source is None else ops.apply_merge(index, st.source, "amax")
    bias_size = None
    if st.bias_size is not None:
        bias_size = ops.apply_merge(index, st.bias_size.unsqueeze(-1)).squeeze(-1)
    return x, replace(st, size=size, pos=pos, source=source, bias_size=bias_size, owner=owner)


def _prune_bias_size(index: ops.SelectIndex, st: _State, fuse: bool, fused_bias: bool):
    """Attention sizes after a prune: the fused token enters attention as one token unless
    ``fused_bias``; kept tokens keep theirs."""
    if st.bias_size is None and (fused_bias or not fuse):
        return None
    base = st.attn_size
    if base is None:
        base = torch.ones(index.keep.shape[0], index.keep.shape[1] + index.dropped.shape[1],
                          device=index.keep.device)
    out = ops.apply_select(index, base.unsqueeze(-1), "sum" if fuse else None).squeeze(-1)
    if not fuse or fused_bias:
        return out
    return torch.cat([out[:, :-1], torch.ones_like(out[:, -1:])], dim=1)


def _prune_state(
    index: ops.SelectIndex, x: torch.Tensor, st: _State, fuse: bool, fused_bias: bool = True
) -> tuple[torch.Tensor, _State]:
    bias_size = _prune_bias_size(index, st, fuse, fused_bias)
    owner, last = (None, None) if st.owner is None else _prune_owner(index, x, st, fuse)
    x = ops.apply_select(index, x, "weighted" if fuse else None)
    size, pos, source = st.size, st.pos, st.source
    if size is None and fuse:
        # unit sizes: every kept token still holds one patch, the fused one all dropped ones
        B, K = index.keep.shape
        size = torch.cat([x.new_ones((B, K), dtype=torch.float32),
                          x.new_full((B, 1), index.dropped.shape[1], dtype=torch.float32)], dim=1)
    elif size is not None:
        size = ops.apply_select(index, size.unsqueeze(-1), "sum" if fuse else None).squeeze(-1)
    if pos is not None:  # sums of positions: the fused token's is the dropped tokens' sum
        pos = ops.apply_select(index, pos, "sum" if fuse else None)
    if source is not None:
        source = ops.apply_select(index, source, "amax" if fuse else None)
    return x, replace(st, size=size, pos=pos, source=source, bias_size=bias_size, owner=owner, last=last)


def _block_step(layout: Layout, blk: nn.Module, x: torch.Tensor, st: _State, step: Step,
                ctl: Controller, extent: float, want_scores: bool):
    """One block: attention → residual → the planned operation → MLP."""
    P = ctl.num_prefix
    plan = ctl.plan
    fast = step.kind == "none" and not want_scores and (st.size is None or not plan.prop_attn)
    if fast:
        # Unreduced block with unit sizes: the family's own forward, bit-for-bit.
        x = layout.whole(blk, x)
        return x, st, BlockTrace(0, "none", step.tokens_in, step.tokens_out, st.size, st.source)

    attn_size = st.attn_size
    bias = ops.proportional_bias(attn_size) if plan.prop_attn and attn_size is not None else None
    x, q, k = layout.attend(blk, x, bias)

    scores = None
    if step.needs_scores or want_scores:
        scores = ops.class_attention(q, k, layout.scale(blk), P, ctl.has_class_token, bias)
    # The trace holds detached tensors only, so it never keeps an autograd graph alive.
    rec = BlockTrace(0, step.kind, step.tokens_in, step.tokens_out, None,
                     scores=scores.detach() if want_scores else None)
    if want_scores and st.source is not None:
        rec.patch_scores = torch.einsum("bn,bnp->bp", scores.detach(), st.source[:, P:])
    rank = scores
    if step.size_norm and st.size is not None:
        rank = scores / st.size[:, P:]

    if step.kind == "merge":
        index = ops.bipartite_matching(ops.head_mean(k), step.r, P)
        x, st = _merge_state(index, x, st)
        rec.merged_similarity = index.similarity.detach()
    elif step.kind == "retokenize":
        index = ops.retokenize_matching(
            ops.head_mean(k), rank, P, step.m, step.r, _centroids(st), step.locality, extent, step.pairs_only
        )
        x, st = _merge_state(index, x, st)
        rec.merged_similarity = index.similarity.detach()
    elif step.kind == "prune":
        index = ops.prune_select(rank, P, step.k, weights=scores)
        x, st = _prune_state(index, x, st, step.fuse, plan.fused_bias)
        rec.fused = step.fuse

    x = layout.mlp(blk, x)
    rec.size, rec.source = st.size, st.source
    return x, st, rec


def _cut_block(layout: Layout, blk: nn.Module, x: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    if x.shape[1] != n_in:
        x = x[:, :n_in]
    x, _, _ = layout.attend(blk, x, None)
    if n_out != n_in:
        x = x[:, :n_out]
    return layout.mlp(blk, x)


def cut_blocks(layout: Layout, blocks: Sequence[nn.Module], x: torch.Tensor,
               tokens: Sequence[tuple[int, int]], checkpointing: bool = False) -> torch.Tensor:
    """The limit of a plan: each block on a sequence simply cut to the plan's (entering,
    leaving) token counts, with no scoring or selection; the fastest any implementation of
    the plan can be (``imagepiece bench``)."""
    for blk, (n_in, n_out) in zip(blocks, tokens, strict=True):
        if checkpointing:
            x = checkpoint(_cut_block, layout, blk, x, n_in, n_out, use_reentrant=False)
        else:
            x = _cut_block(layout, blk, x, n_in, n_out)
    return x


def run_blocks(layout: Layout, blocks: Sequence[nn.Module], x: torch.Tensor, grid: tuple[int, int],
               ctl: Controller, checkpointing: bool = False, taps: Taps | None = None) -> RunOutput:
    """Run ``blocks`` on tokens ``(B, prefix + grid patches, C)`` under ``ctl``'s plan.

    Returns the tokens, their sizes (``None`` while all are 1) and, when ``taps`` asks, the
    outputs of the requested blocks with where each patch is (:class:`GridTap`): everything a
    call produces is returned to that call. Outside compilation the trace is left in
    ``ctl.trace`` for people to read. ``blocks`` may be the plan's first blocks only (a model
    truncated by timm's ``prune_intermediate_layers``).
    """
    steps = ctl.steps(x.shape[1])[: len(blocks)]
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
    if taps is not None and any(s.kind != "none" for s in steps):
        # Paid only when grid features are asked for: one (B, patches) index map.
        owner = torch.arange(P, x.shape[1], device=x.device).expand(B, -1)
        st = replace(st, owner=owner, pruned=taps.pruned)
    trace = Trace()
    tapped: list[GridTap] = []
    extent = float(max(grid))
    for i, (blk, step) in enumerate(zip(blocks, steps, strict=True)):
        if taps is not None and taps.stop is not None and i > taps.stop:
            break
        if checkpointing:
            x, st, rec = checkpoint(_block_step, layout, blk, x, st, step, ctl, extent, want_scores,
                                    use_reentrant=False)
        else:
            x, st, rec = _block_step(layout, blk, x, st, step, ctl, extent, want_scores)
        if taps is not None and i in taps.blocks:
            tapped.append(GridTap(i, x, st.owner, st.last))
        if tracing:
            rec.block = i
            trace.append(rec)
    if tracing:
        ctl.trace = trace
    return RunOutput(x, st.size, tapped, grid)


_SIZES = "_imagepiece_sizes"


def tag_sizes(x: torch.Tensor, size: torch.Tensor | None) -> torch.Tensor:
    """Attach to the features ``x`` the sizes of its tokens (``None``: all 1) and return ``x``.

    For APIs that pool in a second call (timm's ``forward_head(forward_features(x))``): the
    sizes live on the very tensor they describe and die with it, so features of another call,
    eager or compiled, can never be pooled with them.
    """
    setattr(x, _SIZES, (size,))
    return x


def sizes_of(x: torch.Tensor, ctl: Controller) -> torch.Tensor | None:
    """The sizes :func:`tag_sizes` attached to ``x``. Untagged tokens count as one patch each
    only on a model whose plan reduces nothing; otherwise their sizes are unknown: ValueError."""
    tagged = getattr(x, _SIZES, None)
    if tagged is not None and (tagged[0] is None or tuple(tagged[0].shape) == tuple(x.shape[:2])):
        return tagged[0]
    if tagged is None and ctl.plan.is_identity:
        return None
    raise ValueError(
        f"got {x.shape[1]} tokens whose sizes are unknown; on a token-reduced model pool the "
        "tensor forward_features returned, unchanged (its sizes travel with it), pass "
        "size=..., or call model(x)"
    )


def unpatch(model: nn.Module) -> nn.Module:
    """Restore the original classes; the model behaves exactly as before patching."""
    if is_patched(model):
        restore_classes(model)
    return model


def pool_patches(x: torch.Tensor, size: torch.Tensor | None, num_prefix: int) -> torch.Tensor:
    """Average of the patch tokens of ``(B, N, C)``, each weighted by how many patches it stands
    for, so pooling a reduced sequence equals pooling the original patches' groups."""
    tokens = x[:, num_prefix:]
    if size is None:
        return tokens.mean(dim=1)
    return ops.size_weighted_mean(tokens, size[:, num_prefix:])
