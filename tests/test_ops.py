import torch

from imagepiece import ops


def test_bipartite_matching_protects_prefix_and_keeps_order():
    torch.manual_seed(0)
    for prefix in (0, 1, 2, 5):
        metric = torch.randn(3, 40, 8)
        idx = ops.bipartite_matching(metric, 10, prefix)
        assert idx.src.shape == (3, 10)
        if prefix:
            assert torch.equal(idx.keep[:, :prefix], torch.arange(prefix).expand(3, -1))
        out_ids = torch.cat([idx.keep, idx.dst], 1)
        # every input token appears exactly once, either in the output or as a merged source
        all_ids = torch.cat([out_ids, idx.src], 1).sort(1).values
        assert torch.equal(all_ids, torch.arange(40).expand(3, -1))
        assert (idx.src >= prefix).all() and (idx.dst >= prefix).all()
        assert (idx.src % 2 == 0).all() and (idx.dst % 2 == 1).all()  # A = even, B = odd


def test_bipartite_matching_merges_most_similar_pair():
    metric = torch.randn(1, 10, 4)
    metric[0, 4] = metric[0, 7] * 3.0  # token 4 (A) is a scaled copy of token 7 (B)
    idx = ops.bipartite_matching(metric, 1, 1)
    assert idx.src.tolist() == [[4]]
    assert idx.dst[0, idx.dst_slot[0, 0]].item() == 7
    assert torch.allclose(idx.similarity, torch.ones(1, 1))


def test_r_zero_is_identity_and_cap():
    x = torch.randn(2, 9, 3)
    idx = ops.bipartite_matching(x, 0, 1)
    assert torch.equal(ops.apply_merge(idx, x), x)
    assert ops.bipartite_matching(x, 100, 1).src.shape[1] == 4  # (9 - 1) // 2


def test_merge_weighted_is_size_weighted_and_conserves_size():
    x = torch.tensor([[[0.0], [1.0], [3.0], [10.0]]])
    size = torch.tensor([[1.0, 1.0, 3.0, 1.0]])
    # token 1 merges into token 2 (size 3); tokens 0 and 3 stay
    idx = ops.MergeIndex(keep=torch.tensor([[0]]), dst=torch.tensor([[2, 3]]),
                         src=torch.tensor([[1]]), dst_slot=torch.tensor([[0]]),
                         similarity=torch.zeros(1, 1))
    out, new_size = ops.merge_weighted(idx, x, size)
    assert new_size.tolist() == [[1.0, 4.0, 1.0]]
    assert torch.allclose(out[0, 1], torch.tensor([(1.0 * 1 + 3.0 * 3) / 4]))
    assert new_size.sum() == size.sum()


def test_retokenize_only_merges_nonsemantic_tokens():
    torch.manual_seed(1)
    B, N, P = 2, 33, 1
    metric = torch.randn(B, N, 8)
    scores = torch.rand(B, N - P)
    m, r = 12, 6
    idx = ops.retokenize_matching(metric, scores, P, m, r)
    bottom = scores.argsort(1)[:, :m] + P
    for b in range(B):
        allowed = set(bottom[b].tolist())
        assert set(idx.src[b].tolist()) <= allowed
        assert set(idx.dst[b].tolist()) <= allowed
    assert torch.equal(idx.keep[:, :P], torch.zeros(B, 1, dtype=torch.long))
    assert idx.keep.shape[1] + idx.dst.shape[1] == N - r


def test_retokenize_locality_prefers_neighbours():
    # identical features everywhere: only the locality term decides, so every pair is adjacent
    B, P, grid = 1, 1, (6, 6)
    metric = torch.ones(B, P + 36, 4)
    pos = ops.initial_positions(B, P, grid, "cpu", torch.float32)
    scores = torch.rand(B, 36)
    idx = ops.retokenize_matching(metric, scores, P, 16, 8, pos, locality=1.0, grid_extent=6.0)
    src_pos = pos[0, idx.src[0]]
    dst_pos = pos[0, idx.dst[0, idx.dst_slot[0]]]
    dists = (src_pos - dst_pos).norm(dim=-1)
    nonsem = scores.argsort(1)[0, :16] + P
    ns_pos = pos[0, nonsem]
    # the chosen partner is the nearest B-set member for each source
    assert dists.max() <= torch.cdist(ns_pos, ns_pos).max()
    assert (dists > 0).all()


def test_prune_select_and_fusion():
    scores = torch.tensor([[0.1, 0.5, 0.2, 0.15]])
    x = torch.arange(5.0).view(1, 5, 1)  # token 0 is the class token
    sel = ops.prune_select(scores, 1, 2)
    assert sel.keep.tolist() == [[0, 2, 3]]  # descending score order
    fused = ops.apply_select(sel, x, "weighted")
    assert fused.shape == (1, 4, 1)
    assert torch.allclose(fused[0, -1, 0], torch.tensor(0.1 * 1 + 0.15 * 4))  # raw weights
    size = ops.apply_select(sel, torch.ones(1, 5, 1), "sum")
    assert size[0, -1, 0] == 2


def test_class_attention_is_a_distribution_over_all_tokens():
    q, k = torch.randn(2, 3, 10, 4), torch.randn(2, 3, 10, 4)
    s = ops.class_attention(q, k, 0.5, 1, True)
    full = ((q * 0.5) @ k.transpose(-2, -1)).softmax(-1).mean(1)[:, 0, 1:]
    assert torch.allclose(s, full, atol=1e-6)
    s_mean = ops.class_attention(q, k, 0.5, 0, False)
    assert s_mean.shape == (2, 10) and torch.allclose(s_mean.sum(1), torch.ones(2), atol=1e-5)


def test_class_attention_on_strided_keys_with_a_bias_is_the_biased_attention_row():
    """Keys as attention leaves them (a view of the fused qkv projection) and a proportional-
    attention bias ``(B, 1, 1, N)``: the scores are the [CLS] row of the biased attention."""
    qkv = torch.randn(2, 10, 3, 3, 4).permute(2, 0, 3, 1, 4)
    q, k, _ = qkv.unbind(0)
    bias = ops.proportional_bias(torch.rand(2, 10) + 0.5)
    s = ops.class_attention(q, k, 0.5, 1, True, bias)
    full = ((q * 0.5) @ k.transpose(-2, -1) + bias).softmax(-1).mean(1)[:, 0, 1:]
    assert s.shape == (2, 9) and torch.allclose(s, full, atol=1e-6)


def test_one_image_decisions_equal_the_batched_ones():
    """Batch 1 takes a shorter indexing path; each image must get what it gets in a batch."""
    torch.manual_seed(0)
    metric, x = torch.randn(3, 21, 8), torch.randn(3, 21, 5)
    size = torch.rand(3, 21) + 0.5
    scores = torch.rand(3, 20)
    batched = ops.bipartite_matching(metric, 6, 1)
    bx, bsize = ops.merge_weighted(batched, x, size)
    sel = ops.prune_select(scores, 1, 12)
    fused = ops.apply_select(sel, x, "weighted")
    for i in range(3):
        one = ops.bipartite_matching(metric[i:i + 1], 6, 1)
        for a, b in zip(one, batched, strict=True):
            assert torch.equal(a, b[i:i + 1])
        ox, osize = ops.merge_weighted(one, x[i:i + 1], size[i:i + 1])
        assert torch.equal(ox, bx[i:i + 1]) and torch.equal(osize, bsize[i:i + 1])
        one_sel = ops.prune_select(scores[i:i + 1], 1, 12)
        assert torch.equal(ops.apply_select(one_sel, x[i:i + 1], "weighted"), fused[i:i + 1])


def test_prefix_tokens_never_match_even_when_most_similar():
    """Prefix tokens are left out of the matching (not masked): a class token identical to
    a patch token must neither merge nor receive."""
    torch.manual_seed(1)
    metric = torch.randn(2, 12, 4)
    metric[:, 0] = metric[:, 1]  # class token (A side) identical to token 1 (B side)
    metric[:, 2] = metric[:, 1] * 2  # token 2 (A) also matches token 1
    idx = ops.bipartite_matching(metric, 1, 1)
    assert idx.src.tolist() == [[2], [2]]
    assert (idx.dst[torch.arange(2), idx.dst_slot[:, 0]] == 1).all()
    assert (idx.keep[:, 0] == 0).all()


def test_head_mean_equals_the_mean_over_heads_bit_for_bit_with_its_gradient():
    """The merging metric is ToMe's ``k.mean(dim=1)`` exactly, whichever way it is summed."""
    for B, N, H, d in ((1, 197, 6, 64), (2, 17, 1, 8), (64, 50, 2, 32), (40, 50, 3, 32), (40, 50, 6, 32),
                       (1, 50, 12, 16)):
        qkv = torch.randn(B, N, 3 * H * d, requires_grad=True)
        k = qkv.reshape(B, N, 3, H, d).permute(2, 0, 3, 1, 4)[1]  # the strided view attention leaves
        ours, ref = ops.head_mean(k), k.mean(dim=1)
        assert ours.shape == (B, N, d) and torch.equal(ours, ref), (B, N, H, d)
        w = torch.randn_like(ref)
        (g_ours,) = torch.autograd.grad((ours * w).sum(), qkv)
        (g_ref,) = torch.autograd.grad((ref * w).sum(), qkv)
        assert torch.equal(g_ours, g_ref)
