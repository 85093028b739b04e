"""Pure tensor operations behind every token-reduction method.

Nothing here knows about models or modules: each function takes token tensors and returns
new ones. Tokens are laid out ``[prefix | patch tokens]`` along dim 1; prefix tokens (class,
distillation, register tokens) are never merged, pruned or fused.

A decision (which tokens merge, which are kept) is computed once as index tensors and then
applied to every per-token tensor that travels with the tokens (features, sizes, centroids,
source maps) with :func:`apply_merge` / :func:`apply_select`, so no sort is repeated.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch

__all__ = [
    "MergeIndex",
    "merge_weighted",
    "size_weighted_mean",
    "SelectIndex",
    "apply_merge",
    "apply_select",
    "bipartite_matching",
    "class_attention",
    "head_mean",
    "initial_positions",
    "initial_sources",
    "prune_select",
    "proportional_bias",
    "retokenize_matching",
    "unmerge",
]


# --------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------


def class_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    num_prefix: int,
    has_class_token: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged post-softmax attention that the patch tokens receive from one query (fp32).

    With a class token this is the [CLS] query row (EViT's score). Without one there is no
    [CLS] query; we use the mean query as a stand-in, which ranks tokens by how much an
    average token attends to them, at the same O(N·d) cost. Returns ``(B, N - num_prefix)``.

    q, k: ``(B, H, N, d)``; bias: ``(B, 1, 1, N)`` additive logit bias (proportional attention).
    """
    query = q[:, :, :1] if has_class_token else q.mean(dim=2, keepdim=True)
    # Keys times the query column, not query times transposed keys: on CPU the transposed
    # strided keys are copied first (DeiT-S, batch 32: 7.9 against 3.3 ms;
    # studies/class_attention_micro.py). The same products up to float rounding.
    logits = (k @ (query * scale).transpose(-2, -1)).squeeze(-1)  # (B, H, N)
    if bias is not None:
        logits = logits + bias.squeeze(2)
    # Kept in fp32: casting back to fp16/bf16 would create ties that change the ranking.
    attn = logits.float().softmax(dim=-1).mean(dim=1)  # (B, N)
    return attn[:, num_prefix:]


def head_mean(k: torch.Tensor) -> torch.Tensor:
    """Mean over heads of keys ``(B, H, N, d)``: ToMe's merging metric, ``(B, N, d)``.

    Equal bit for bit to ``k.mean(dim=1)``. On CPU, a mean over a few heads of the strided view
    attention leaves is slow (the study's model, 2 heads at batch 256: 4x the time of adding the
    heads' slices), while each added slice costs one call; so large keys with up to 6 heads
    are added slice by slice, small ones (batch-1 serving) reduced in one call.
    """
    H = k.shape[1]
    if H > 6 or (H > 2 and k[:, 0].numel() < 65536):
        return k.mean(dim=1)
    heads = k.unbind(1)
    total = heads[0].clone() if H == 1 else heads[0] + heads[1]
    for head in heads[2:]:
        total += head
    return total.div_(H) if H > 1 else total


def proportional_bias(size: torch.Tensor) -> torch.Tensor:
    """Additive attention bias ``log(size)`` of each key, shaped ``(B, 1, 1, N)`` for SDPA."""
    return size.log()[:, None, None, :]


# --------------------------------------------------------------------------------------
# Initial per-token state
# --------------------------------------------------------------------------------------


def initial_sources(batch: int, num_prefix: int, num_patches: int, device, dtype) -> torch.Tensor:
    """0/1 map ``(B, P + n, n)``: which original patches each token stands for.

    Prefix tokens stand for no patch (zero rows), so a source map sums to the patch count.
    """
    eye = torch.eye(num_patches, device=device, dtype=dtype)
    src = torch.cat([torch.zeros(num_prefix, num_patches, device=device, dtype=dtype), eye], dim=0)
    return src.unsqueeze(0).expand(batch, -1, -1)


def initial_positions(
    batch: int, num_prefix: int, grid: tuple[int, int], device, dtype
) -> torch.Tensor:
    """Grid centroids ``(B, P + n, 2)`` as (row, col) in patch units; prefix tokens at 0."""
    rows, cols = grid
    yy, xx = torch.meshgrid(
        torch.arange(rows, device=device, dtype=dtype),
        torch.arange(cols, device=device, dtype=dtype),
        indexing="ij",
    )
    pos = torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=-1)
    pos = torch.cat([torch.zeros(num_prefix, 2, device=device, dtype=dtype), pos], dim=0)
    return pos.unsqueeze(0).expand(batch, -1, -1)


# --------------------------------------------------------------------------------------
# Merging
# --------------------------------------------------------------------------------------


class MergeIndex(NamedTuple):
    """A merge decision on a sequence, reusable for any per-token tensor.

    The output is ``keep`` tokens gathered from the input (in that order) followed by
    ``dst`` tokens; ``src`` tokens are added into ``dst`` slot ``dst_slot``.
    """

    keep: torch.Tensor  # (B, K) input indices copied to the front of the output
    dst: torch.Tensor  # (B, D) input indices of the destination tokens (appended after keep)
    src: torch.Tensor  # (B, r) input indices of the tokens merged away
    dst_slot: torch.Tensor  # (B, r) which of the D destinations each source joins
    similarity: torch.Tensor  # (B, r) matching score of each merged pair (for analysis)


def _flat_index(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Per-image token indices ``(B, K)`` as row indices into a ``(B * n, C)`` view."""
    if idx.shape[0] == 1:  # one image (batch-1 serving): its indices are the row indices
        return idx.reshape(-1)
    offset = torch.arange(idx.shape[0], device=idx.device).unsqueeze(1) * n
    return (idx + offset).reshape(-1)


def _gather(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    # index_select on rows of a flat view: an expanded gather index would be materialised
    # as B·K·C integers, costing more memory traffic than the features themselves.
    B, N, C = x.shape
    return x.reshape(B * N, C).index_select(0, _flat_index(idx, N)).view(B, idx.shape[1], C)


def apply_merge(index: MergeIndex, x: torch.Tensor, reduce: str = "sum") -> torch.Tensor:
    """Apply a merge decision to ``x`` of shape ``(B, N, C)``.

    ``reduce="sum"`` adds sources into destinations (use on ``x * size`` and on ``size`` for a
    size-weighted average); ``"amax"`` is for 0/1 source maps. One gather builds the output and
    one in-place scatter adds the sources, so the cost is a single pass over the tokens.
    """
    if index.src.shape[1] == 0:
        return x
    B, _, C = x.shape
    out = _gather(x, torch.cat([index.keep, index.dst], dim=1))
    M = out.shape[1]
    slot = _flat_index(index.dst_slot + index.keep.shape[1], M)
    src = _gather(x, index.src).reshape(-1, C)
    flat = out.view(B * M, C)
    if reduce == "sum":
        flat.index_add_(0, slot, src)
    else:
        with warnings.catch_warnings():  # "index_reduce is in beta": used for 0/1 maps only
            warnings.simplefilter("ignore", UserWarning)
            flat.index_reduce_(0, slot, src, reduce, include_self=True)
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` scaled to unit length, so a matrix product of two such sets is cosine."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def _best_matches(
    a: torch.Tensor, b: torch.Tensor, penalty: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bipartite soft matching core: each A row picks its best B column.

    ``a`` and ``b`` are unit rows (:func:`_unit`, normalised once for the whole sequence).
    Returns (order of A rows by best score descending, best column per A, raw cosine of the
    best pair). ``penalty`` (added to the cosine) encodes locality.
    """
    cos = a @ b.transpose(-1, -2)
    if penalty is None:  # the best score is the cosine itself: no second lookup
        best, best_idx = cos.max(dim=-1)
        return best.argsort(dim=-1, descending=True), best_idx, best
    best, best_idx = (cos + penalty).max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    best_cos = cos.gather(-1, best_idx.unsqueeze(-1)).squeeze(-1)
    return order, best_idx, best_cos


def bipartite_matching(metric: torch.Tensor, r: int, num_prefix: int) -> MergeIndex:
    """ToMe's bipartite soft matching (Bolya et al., ICLR 2023) over the whole sequence.

    Tokens alternate by position into A (even) and B (odd); each A token finds its most similar
    B token (cosine of ``metric``) and the r A tokens with the highest best-score merge into
    their match. Prefix tokens are protected (never a source when in A, never a destination when
    in B); with one class token and a distillation token this is exactly ToMe's rule, and with
    registers it generalises it. r is capped at ``(N - num_prefix) // 2``. The output keeps
    prefix tokens in their original order at the front, then unmerged A, then B; unmerged A go
    back to positional order when there are prefix tokens (ToMe sorts when there is a [CLS]).
    r = 0 returns an identity decision.
    """
    B, N, _ = metric.shape
    r = min(r, (N - num_prefix) // 2)
    device = metric.device
    if r <= 0:
        keep = torch.arange(N, device=device).expand(B, -1)
        empty = keep[:, :0]
        return MergeIndex(keep, empty, empty, empty, metric.new_zeros(B, 0))

    pa, pb = (num_prefix + 1) // 2, num_prefix // 2  # prefix tokens in A and in B
    # Prefix tokens take no part in the matching: A row i is token 2(pa + i), B column j is
    # token 2(pb + j) + 1, so no score needs masking and a column is a destination slot.
    metric = _unit(metric)
    order, best_idx, best_cos = _best_matches(metric[:, 2 * pa::2], metric[:, 2 * pb + 1::2])
    src_a = order[:, :r]
    unm_a = order[:, r:]
    if num_prefix:
        unm_a = unm_a.sort(dim=-1).values
    src = (src_a + pa) * 2
    dst_slot = best_idx.gather(1, src_a)
    similarity = best_cos.gather(1, src_a)
    dst = torch.arange(2 * pb + 1, N, 2, device=device).expand(B, -1)
    if num_prefix:
        # Prefix tokens stay in front in their original order, then unmerged A (sorted).
        prefix = torch.arange(num_prefix, device=device).expand(B, -1)
        keep = torch.cat([prefix, (unm_a + pa) * 2], dim=1)
    else:
        keep = unm_a * 2
    return MergeIndex(keep, dst, src, dst_slot, similarity)


def retokenize_matching(
    metric: torch.Tensor,
    scores: torch.Tensor,
    num_prefix: int,
    num_nonsemantic: int,
    r: int,
    positions: torch.Tensor | None = None,
    locality: float = 0.0,
    grid_extent: float = 1.0,
    pairs_only: bool = False,
) -> MergeIndex:
    """ImagePiece re-tokenization: merge similar non-semantic tokens, never semantic ones.

    The ``num_nonsemantic`` patch tokens with the lowest ``scores`` (class attention) form the
    non-semantic set. It is put back in sequence order (raster order before any reduction) and
    split alternately into A and B; each A token finds its most similar B token by cosine of
    ``metric`` minus ``locality · distance / grid_extent`` between grid centroids (nearby groups
    are favoured, as pieces of one object usually are), and the ``r`` A tokens with the best
    matches merge into them. Many-to-one as in ToMe: several A tokens may join one B token.
    ``pairs_only`` makes it one-to-one: pairs are taken greedily by descending score, each B
    token receiving at most one A token. Output order: prefix, semantic tokens (by descending
    score), unmerged non-semantic A tokens, then B tokens (the destinations); semantic tokens
    are copied unchanged. r = 0 is an identity decision.

    metric: ``(B, N, C)``; scores: ``(B, N - P)``; positions: ``(B, N, 2)``.
    """
    B, N, _ = metric.shape
    n = N - num_prefix
    m = num_nonsemantic
    if not 0 <= m <= n:
        raise ValueError(f"num_nonsemantic={m} must lie in [0, {n}] (patch tokens present)")
    if not 0 <= r <= m // 2:
        raise ValueError(f"r={r} merges need 2r <= {m} non-semantic tokens")
    device = metric.device
    if r == 0:
        keep = torch.arange(N, device=device).expand(B, -1)
        empty = keep[:, :0]
        return MergeIndex(keep, empty, empty, empty, metric.new_zeros(B, 0))

    rank = scores.argsort(dim=-1, descending=True) + num_prefix  # one sort decides the sets
    semantic = rank[:, : n - m]
    nonsem = rank[:, n - m :].sort(dim=-1).values  # sequence order, so A/B alternate
    a_idx, b_idx = nonsem[:, ::2], nonsem[:, 1::2]

    penalty = None
    if locality and positions is not None:
        pa, pb = _gather(positions, a_idx), _gather(positions, b_idx)
        penalty = -locality * torch.cdist(pa, pb) / grid_extent
    metric = _unit(metric)
    a, b = _gather(metric, a_idx), _gather(metric, b_idx)
    if pairs_only:
        src_a, unm_a, dst_slot, sim = _one_to_one(a, b, penalty, r)
    else:
        order, best_idx, best_cos = _best_matches(a, b, penalty)
        src_a, unm_a = order[:, :r], order[:, r:]
        dst_slot, sim = best_idx.gather(1, src_a), best_cos.gather(1, src_a)
    prefix = torch.arange(num_prefix, device=device).expand(B, -1)
    keep = torch.cat([prefix, semantic, a_idx.gather(1, unm_a)], dim=1)
    return MergeIndex(keep=keep, dst=b_idx, src=a_idx.gather(1, src_a), dst_slot=dst_slot,
                      similarity=sim)


def _one_to_one(
    a: torch.Tensor, b: torch.Tensor, penalty: torch.Tensor | None, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Greedy one-to-one matching of ``r`` A rows to distinct B columns, best score first.

    Returns (merged A rows, unmerged A rows in A order, B column of each merged row, raw cosine
    of each pair). ``r`` static steps of a masked argmax keep shapes static for compile/ONNX;
    the sets are small (the non-semantic tokens of one block), so the loop is cheap. ``a`` and
    ``b`` are unit rows.
    """
    cos = a @ b.transpose(-1, -2)
    scores = (cos if penalty is None else cos + penalty).clone()
    Bn, na, nb = scores.shape
    rows, cols = [], []
    for _ in range(r):
        flat = scores.flatten(1).argmax(dim=1)
        i, j = flat // nb, flat % nb
        rows.append(i)
        cols.append(j)
        scores.scatter_(1, i.view(Bn, 1, 1).expand(Bn, 1, nb), -math.inf)
        scores.scatter_(2, j.view(Bn, 1, 1).expand(Bn, na, 1), -math.inf)
    src, slot = torch.stack(rows, 1), torch.stack(cols, 1)
    taken = torch.zeros(Bn, na, dtype=torch.bool, device=src.device).scatter(1, src, True)
    # stable sort of the "taken" flags lists the unmerged rows first, in A order
    unm = taken.to(torch.int8).argsort(dim=1, stable=True)[:, : na - r]
    sim = cos.gather(1, src.unsqueeze(-1).expand(-1, -1, nb)).gather(2, slot.unsqueeze(-1)).squeeze(-1)
    return src, unm, slot, sim


# --------------------------------------------------------------------------------------
# Selection (EViT)
# --------------------------------------------------------------------------------------


class SelectIndex(NamedTuple):
    """A prune decision: ``keep`` input indices (prefix first, then kept patch tokens by
    descending score) and the ``dropped`` patch-token indices with their raw scores."""

    keep: torch.Tensor  # (B, P + k)
    dropped: torch.Tensor  # (B, n - k)
    dropped_weight: torch.Tensor  # (B, n - k) raw class-attention of dropped tokens


def prune_select(scores: torch.Tensor, num_prefix: int, k: int,
                 weights: torch.Tensor | None = None) -> SelectIndex:
    """EViT's top-k: keep the k patch tokens with the highest ``scores``.

    Kept tokens come in descending score order (as in EViT); prefix tokens stay in front.
    ``weights`` (default: ``scores``) are what the fused token weights the dropped tokens by,
    so a ranking by another score (e.g. size-normalised) still fuses with raw attention.
    """
    B, n = scores.shape
    if not 0 < k <= n:
        raise ValueError(f"k={k} kept tokens must lie in [1, {n}]")
    order = scores.argsort(dim=-1, descending=True)
    prefix = torch.arange(num_prefix, device=scores.device).expand(B, -1)
    keep = torch.cat([prefix, order[:, :k] + num_prefix], dim=1)
    dropped = order[:, k:]
    weights = scores if weights is None else weights
    return SelectIndex(keep, dropped + num_prefix, weights.gather(1, dropped))


def apply_select(index: SelectIndex, x: torch.Tensor, fuse: str | None = None) -> torch.Tensor:
    """Keep the selected tokens of ``(B, N, C)``; optionally append one fused token.

    ``fuse="weighted"``: EViT's fused token ``Σ a_i x_i`` with the raw (not renormalised)
    class-attention weights of the dropped tokens. ``fuse="sum"``: the plain sum, for sizes
    (so sizes keep summing to the patch count). ``fuse="amax"``: union, for source maps.
    """
    if fuse is None:
        return _gather(x, index.keep)
    # one gather for kept and dropped tokens (the per-call cost, not the bytes, dominates)
    both = _gather(x, torch.cat([index.keep, index.dropped], dim=1))
    kept, dropped = both[:, : index.keep.shape[1]], both[:, index.keep.shape[1]:]
    if fuse == "weighted":
        extra = (dropped * index.dropped_weight.unsqueeze(-1).to(x.dtype)).sum(1, keepdim=True)
    elif fuse == "sum":
        extra = dropped.sum(1, keepdim=True)
    elif fuse == "amax":
        extra = dropped.amax(1, keepdim=True)
    else:
        raise ValueError(f"fuse={fuse!r}; allowed: None, 'weighted', 'sum', 'amax'")
    return torch.cat([kept, extra], dim=1)


def size_weighted_mean(x: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``(B, N, C)`` weighted by ``size`` ``(B, N)``: a merged token counts
    as the patches it replaced, so average pooling equals pooling over the original patches."""
    w = size.unsqueeze(-1).to(x.dtype)
    return (x * w).sum(1) / w.sum(1)


def unmerge(tokens: torch.Tensor, owner: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
    """Features of the original patches from a reduced sequence: patch ``p`` of image ``b`` gets
    ``tokens[b, owner[b, p]]`` (so a merged group's members share its feature); where ``owner``
    is -1 (no token holds the patch) it gets ``fill[b, p]``, or zeros without ``fill``.

    tokens: ``(B, N, C)``; owner: ``(B, n)`` long; fill: ``(B, n, C)``. Returns ``(B, n, C)``.
    """
    grid = _gather(tokens, owner.clamp_min(0))
    held = (owner >= 0).unsqueeze(-1)
    return torch.where(held, grid, grid.new_zeros(()) if fill is None else fill.to(grid.dtype))


def merge_weighted(
    index: MergeIndex, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted average merge of ``x``; sizes add up. ``size=None`` means all ones.

    Returns ``(x, size)`` with ``size`` as float32 ``(B, N')``. Only destination and source
    rows are weighted, in place, so the whole merge costs one new ``(B, N', C)`` tensor.
    """
    B, N, C = x.shape
    if index.src.shape[1] == 0:
        return x, x.new_ones((B, N), dtype=torch.float32) if size is None else size
    K = index.keep.shape[1]
    rows = torch.cat([index.keep, index.dst], dim=1)
    out = _gather(x, rows)
    src = _gather(x, index.src)
    if torch.onnx.is_in_onnx_export():
        return _merge_weighted_out_of_place(index, out, src, size, K)
    dst = out[:, K:]
    if size is None:
        out_size = x.new_ones(rows.shape, dtype=torch.float32)
        src_size = x.new_ones(index.src.shape, dtype=torch.float32)
    else:
        out_size, src_size = size.gather(1, rows), size.gather(1, index.src)
        dst.mul_(out_size[:, K:, None].to(x.dtype))
        src.mul_(src_size[..., None].to(x.dtype))
    slot = index.dst_slot + K
    out.view(-1, C).index_add_(0, _flat_index(slot, rows.shape[1]), src.view(-1, C))
    out_size = out_size.scatter_add(1, slot, src_size)
    dst.div_(out_size[:, K:, None].to(x.dtype))
    return out, out_size


def _merge_weighted_out_of_place(
    index: MergeIndex, out: torch.Tensor, src: torch.Tensor, size: torch.Tensor | None, K: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`merge_weighted` for the TorchScript ONNX exporter, which drops in-place writes
    through views and exports ``index_add``/``scatter_add`` so that repeated destinations
    overwrite instead of adding. Sources are added through a 0/1 assignment matrix instead;
    the same sums up to float rounding (keep rows are multiplied and divided by exactly 1)."""
    B, M, C = out.shape
    if size is None:
        out_size = out.new_ones((B, M), dtype=torch.float32)
        src_size = out.new_ones(index.src.shape, dtype=torch.float32)
    else:
        out_size = size.gather(1, torch.cat([index.keep, index.dst], dim=1))
        src_size = size.gather(1, index.src)
    ones = torch.ones_like(out_size[:, :K])
    out = out * torch.cat([ones, out_size[:, K:]], dim=1)[..., None].to(out.dtype)
    src = src * src_size[..., None].to(out.dtype)
    slot = index.dst_slot + K
    assign = slot[:, None, :] == torch.arange(M, device=slot.device)[None, :, None]  # (B, M, r)
    out = out + assign.to(out.dtype) @ src
    out_size = out_size + (assign.to(out_size.dtype) @ src_size[..., None]).squeeze(-1)
    out = out / torch.cat([ones, out_size[:, K:]], dim=1)[..., None].to(out.dtype)
    return out, out_size
