"""What ImagePiece means (docs/methods.md), pinned so that a wrong implementation fails.

Each test names, in its docstring, the deliberate mutation it was checked against
(``python tests/mutants.py`` re-runs those checks).
"""

import math

import pytest
import timm
import torch

import imagepiece
from conftest import tiny_vit
from imagepiece import ops
from imagepiece.coherence import add_coherence


def images(size, n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


def depth8():
    """8 blocks: prune at 2, 4, 6 and re-tokenize at 1, 3, 5 (the paper's shape)."""
    return tiny_vit(name="deit_tiny_patch16_224", depth=8)


# ---------------------------------------------------------------------------------------
# An independent reference forward, one image at a time with Python lists
# ---------------------------------------------------------------------------------------


def _attention(blk, t, bias_size):
    """Unfused attention with the whole map; log(size) of each key added to the logits."""
    attn = blk.attn
    x = blk.norm1(t)[None]
    N, C = t.shape
    qkv = attn.qkv(x).reshape(1, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = attn.q_norm(qkv[0]), attn.k_norm(qkv[1]), qkv[2]
    logits = (q * attn.scale) @ k.transpose(-2, -1) + torch.tensor(bias_size).log()
    a = logits.softmax(-1)
    out = attn.proj((a @ v).transpose(1, 2).reshape(1, N, C))[0]
    return t + blk.ls1(out), a[0, :, 0, 1:].mean(0), k[0].mean(0)


class _Tok:
    """One token: features, patches it stands for, size seen by attention, grid centroid."""

    def __init__(self, x, size, bias_size, pos):
        self.x, self.size, self.bias_size, self.pos = x, size, bias_size, pos


def _combine(toks, weights=None):
    """Size-weighted average (merge) or, with weights, EViT's raw weighted sum (fusion)."""
    size = sum(t.size for t in toks)
    pos = tuple(sum(t.size * t.pos[d] for t in toks) / size for d in range(2))
    if weights is None:
        x = sum(t.size * t.x for t in toks) / size
    else:
        x = sum(w * t.x for w, t in zip(weights, toks, strict=True))
    return _Tok(x, size, sum(t.bias_size for t in toks), pos)


def _ref_retokenize(toks, scores, metric, m, r, locality, extent, pairs_only):
    n = len(toks) - 1
    order = sorted(range(n), key=lambda j: -scores[j])
    semantic, nonsem = order[: n - m], sorted(order[n - m:])
    A, B = nonsem[0::2], nonsem[1::2]
    unit = metric / metric.norm(dim=-1, keepdim=True)
    sim = {}
    for a in A:
        for b in B:
            cos = float(unit[a + 1] @ unit[b + 1])
            dist = math.dist(toks[a + 1].pos, toks[b + 1].pos)
            sim[a, b] = cos - locality * dist / extent
    if pairs_only:  # greedy one-to-one, best pair first
        pairs, used_a, used_b = [], set(), set()
        for (a, b), _ in sorted(sim.items(), key=lambda kv: -kv[1]):
            if len(pairs) < r and a not in used_a and b not in used_b:
                pairs.append((a, b))
                used_a.add(a)
                used_b.add(b)
    else:  # each A picks its best B; the r best A merge (many-to-one)
        best = {a: max(B, key=lambda b, a=a: sim[a, b]) for a in A}
        pairs = sorted(((a, best[a]) for a in A), key=lambda p: -sim[p])[:r]
    into = {b: [toks[b + 1]] for b in B}
    for a, b in pairs:
        into[b].append(toks[a + 1])
    merged = {a for a, _ in pairs}
    return ([toks[0]] + [toks[j + 1] for j in semantic] + [toks[a + 1] for a in A if a not in merged]
            + [_combine(into[b]) for b in B])


def _ref_prune(toks, scores, raw, k, fused_bias):
    n = len(toks) - 1
    order = sorted(range(n), key=lambda j: -scores[j])
    kept, dropped = order[:k], order[k:]
    fused = _combine([toks[j + 1] for j in dropped], [float(raw[j]) for j in dropped])
    if not fused_bias:
        fused.bias_size = 1.0
    return [toks[0]] + [toks[j + 1] for j in kept] + [fused]


def ref_imagepiece_forward(model, x, keep_rate=0.7, locality=0.1, pairs_only=False, size_norm=False,
                           fused_bias=True, retokenize_blocks=None):
    """ImagePiece + EViT per docs/methods.md on a class-token ViT: re-tokenize in the block before each
    prune block (bottom m = what the prune drops, A/B alternate in sequence order, many-to-one
    or greedy one-to-one matching on cosine − locality·distance/extent), then EViT keeps
    ceil(keep_rate · n_before_retokenization) tokens and fuses the rest with raw weights. With
    ``retokenize_blocks`` several rounds may precede a prune; n counts the tokens entering the
    first of them."""
    depth = len(model.blocks)
    prunes = {depth // 4, depth // 2, 3 * depth // 4}
    retoks = {b - 1 for b in prunes} if retokenize_blocks is None else set(retokenize_blocks)
    gh, gw = model.patch_embed.grid_size
    feats = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    outs = []
    for img in feats:
        toks = [_Tok(img[0], 0.0, 1.0, (0.0, 0.0))]
        toks += [_Tok(img[i + 1], 1.0, 1.0, (float(i // gw), float(i % gw))) for i in range(gh * gw)]
        base = None
        for i, blk in enumerate(model.blocks):
            y, cls, metric = _attention(blk, torch.stack([t.x for t in toks]), [t.bias_size for t in toks])
            for t, row in zip(toks, y, strict=True):
                t.x = row
            scores = [float(cls[j]) / (toks[j + 1].size if size_norm else 1.0) for j in range(len(cls))]
            n = len(toks) - 1
            if i in retoks:
                base = n if base is None else base
                m = n - math.ceil(keep_rate * base)
                toks = _ref_retokenize(toks, scores, metric, m, m // 2, locality, float(max(gh, gw)),
                                       pairs_only)
            elif i in prunes:
                toks = _ref_prune(toks, scores, cls, math.ceil(keep_rate * (base or n)), fused_bias)
                base = None
            t = torch.stack([t.x for t in toks])
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
            for tok, row in zip(toks, t, strict=True):
                tok.x = row
        outs.append(model.forward_head(model.norm(torch.stack([t.x for t in toks])[None])))
    return torch.cat(outs)


@pytest.mark.parametrize("knobs", [
    {},
    dict(keep_rate=0.5, locality=0.0),
    dict(pairs_only=True, size_norm=True, fused_bias=False),
])
def test_imagepiece_matches_reference(knobs):
    """Logits equal an independent reference forward. Caught mutations: ToMe matching over all
    tokens instead of the non-semantic set; the compounding budget; locality ignored; the fused
    token's bias switch ignored; size_norm ignored; pairs_only ignored."""
    model = depth8()
    x = images(64)
    with torch.no_grad():
        ref = ref_imagepiece_forward(model, x, **knobs)
        imagepiece.patch(model, "imagepiece", **knobs)
        out = model(x)
    evit = imagepiece.make_plan("evit", depth=8, keep_rate=knobs.get("keep_rate", 0.7)).resolve(8, 65, 1)
    assert [t.tokens_out for t in model.imagepiece.trace if t.kind == "prune"] == \
        [s.tokens_out for s in evit if s.kind == "prune"]
    assert (out - ref).abs().max() <= 1e-5


def test_centroids_of_groups_merged_twice_are_size_weighted():
    """Two rounds before the first prune (blocks 0 and 1, strong locality, ranking by attention
    / size so that round-1 groups can be non-semantic again): groups merge a second time, where
    their grid centroids must be weighted by size (the reference's ``_combine``). Caught
    mutation: centroids merged as plain means (``runtime._merge_state`` without sizes), which
    one round, or groups that rank as semantic, cannot show (max logit change 0.06 here)."""
    knobs = dict(keep_rate=0.5, locality=1.0, retokenize_blocks=(0, 1, 3, 5), size_norm=True)
    model = depth8()
    x = images(64)
    with torch.no_grad():
        ref = ref_imagepiece_forward(model, x, **knobs)
        imagepiece.patch(model, "imagepiece", **knobs)
        out = model(x)
    assert [t.kind for t in model.imagepiece.trace][:3] == ["retokenize", "retokenize", "prune"]
    assert (out - ref).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------
# Only non-semantic tokens merge; semantic tokens pass through untouched
# ---------------------------------------------------------------------------------------


def _groups(src_in, src_out):
    """For each output token, the input tokens it contains: (B, n_out, n_in) 0/1."""
    return (src_out @ src_in.transpose(1, 2)) > 0


def test_only_non_semantic_tokens_are_merged():
    """At every re-tokenization block, every token of every merged group is among the bottom m
    by that block's class attention, and merges number exactly r. Caught mutation: ToMe's
    bipartite matching over all tokens in place of ``retokenize_matching``."""
    model = imagepiece.patch(depth8(), "imagepiece", keep_rate=0.6)
    model.imagepiece.record(sources=True, scores=True)
    with torch.no_grad():
        model(images(64, n=3))
    trace, steps = model.imagepiece.trace, model.imagepiece.steps(65)
    P = 1
    checked = 0
    for i, step in enumerate(steps):
        if step.kind != "retokenize":
            continue
        src_in = trace[i - 1].source[:, P:] if i else torch.eye(64).expand(3, -1, -1)
        members = _groups(src_in, trace[i].source[:, P:])  # (B, n_out, n_in)
        bottom = trace[i].scores.argsort(dim=1)[:, : step.m]
        is_bottom = torch.zeros_like(trace[i].scores, dtype=torch.bool).scatter(1, bottom, True)
        merged_groups = members.sum(-1) > 1
        for b in range(3):
            inside = members[b][merged_groups[b]].any(0)  # input tokens in a merged group
            assert inside.any()
            assert is_bottom[b][inside].all(), f"block {i}: a semantic token was merged"
        assert ((members.sum(-1) - 1).clamp_min(0).sum(-1) == step.r).all()
        checked += 1
    assert checked == 3


def test_semantic_tokens_leave_bit_identical():
    """The merge copies semantic tokens unchanged. Caught mutation: merging over all tokens."""
    g = torch.Generator().manual_seed(1)
    B, P, n, C = 2, 1, 40, 16
    x = torch.randn(B, P + n, C, generator=g)
    metric = torch.randn(B, P + n, 8, generator=g)
    scores = torch.rand(B, n, generator=g)
    size = torch.randint(1, 4, (B, P + n), generator=g).float()
    m = 14
    for pairs_only in (False, True):
        index = ops.retokenize_matching(metric, scores, P, m, m // 2, pairs_only=pairs_only)
        out, _ = ops.merge_weighted(index, x, size)
        semantic = scores.argsort(dim=1, descending=True)[:, : n - m] + P
        for b in range(B):
            assert torch.equal(out[b, P:P + n - m], x[b, semantic[b]])
            assert not set(index.src[b].tolist()) & set(semantic[b].tolist())


def test_pairs_only_forms_pairs_and_rounds_grow_them():
    """pairs_only: one round forms groups of exactly two; a second round grows groups beyond
    two, to at most four; the default many-to-one matching forms larger groups in one round.
    (size_norm for round two: with raw scores a pair's class attention is about the sum of its
    parts, so pairs rank as semantic and the second round merges only singletons.) Caught
    mutation: ``pairs_only`` ignored (falls back to many-to-one)."""
    x = images(64, n=2)

    def max_group(**kw):
        model = imagepiece.patch(depth8(), "imagepiece", **kw)
        with torch.no_grad():
            model(x)
        return [int(t.size[:, 1:].max()) if t.size is not None else 1 for t in model.imagepiece.trace]

    assert max_group(pairs_only=True)[1] == 2
    assert max_group()[1] > 2
    two = imagepiece.patch(tiny_vit(name="deit_tiny_patch16_224", depth=12), "imagepiece", rounds=2,
                           pairs_only=True, size_norm=True)
    with torch.no_grad():
        two(x)
    first, second = (int(t.size[:, 1:].max()) for t in two.imagepiece.trace[1:3])
    assert first == 2 and 2 < second <= 4


# ---------------------------------------------------------------------------------------
# Locality, budget, coherence
# ---------------------------------------------------------------------------------------


def _merged_distance(locality):
    """Mean grid distance between patches that share a merged group after the first round."""
    model = imagepiece.patch(depth8(), "imagepiece", locality=locality)
    model.imagepiece.record(sources=True)
    with torch.no_grad():
        model(images(64, n=4, seed=3))
    src = model.imagepiece.trace[1].source[:, 1:]  # after the re-tokenization at block 1
    grid = torch.stack(torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij"), -1).view(64, 2)
    dists = []
    for b in range(src.shape[0]):
        for row in src[b]:
            idx = row.nonzero().flatten()
            if len(idx) > 1:
                dists.append(torch.pdist(grid[idx]).mean())
    return torch.stack(dists).mean()


def test_locality_favours_nearby_merges():
    """Caught mutations: the locality term dropped from the matching score; centroids not
    passed to the matching."""
    assert _merged_distance(1.0) < 0.8 * _merged_distance(0.0)


@pytest.mark.parametrize("name, depth", [("deit_small_patch16_224", 12), ("deit_tiny_patch16_224", 8)])
@pytest.mark.parametrize("keep_rate", [0.5, 0.7])
def test_budget_equals_evit_after_every_prune_block(name, depth, keep_rate):
    """Token counts after every prune block equal EViT's at the same keep rate (DeiT-S 224:
    139, 99, 71 at 0.7). Caught mutation: the compounding budget (k from the merged count)."""
    torch.manual_seed(0)
    model = timm.create_model(name, depth=depth).eval()
    x = images(224, n=1)
    counts = {}
    for plan in ("evit", "imagepiece"):
        imagepiece.patch(model, plan, keep_rate=keep_rate)
        with torch.no_grad():
            model(x)
        counts[plan] = [t.tokens_out - 1 for t in model.imagepiece.trace]
    prunes = [i for i, t in enumerate(model.imagepiece.trace) if t.kind == "prune"]
    assert len(prunes) == 3
    assert [counts["imagepiece"][i] for i in prunes] == [counts["evit"][i] for i in prunes]
    if name == "deit_small_patch16_224" and keep_rate == 0.7:
        assert [counts["imagepiece"][i] for i in prunes] == [139, 99, 71]


@pytest.mark.parametrize("mode", ["stem", "residual"])
def test_coherence_bias_overlaps_patches(mode):
    """A pixel just outside patch p changes p's embedding with the coherence bias, and does not
    with the plain linear patchify. Caught mutation: a non-overlapping per-patch convolution
    (kernel = stride = patch size) as the stem."""
    torch.manual_seed(0)
    plain = tiny_vit().patch_embed.eval()
    coherent = add_coherence(tiny_vit(), mode).patch_embed.eval()
    if mode == "residual":  # trained, not zero-initialised: the branch contributes
        torch.nn.init.normal_(coherent.proj.branch.out.weight, std=0.1)
    x = images(64, n=1)
    y = x.clone()
    y[0, :, 7, 12] += 5.0  # row 7 lies just above patch (1, 1), which covers rows/cols 8..15
    p = 1 * 8 + 1
    with torch.no_grad():
        for pe, changes in ((plain, False), (coherent, True)):
            a, b = pe(x)[0, p], pe(y)[0, p]
            assert (not torch.equal(a, b)) == changes
            assert torch.equal(pe(x)[0, 3 * 8 + 3], pe(y)[0, 3 * 8 + 3])  # far away: unchanged
