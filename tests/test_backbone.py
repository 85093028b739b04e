"""Reduced models as backbones (issue 24) and per-call token state (issue 22, item 3).

What a forward pass produces (sizes, grid features) belongs to that call: timm's two-step
pooling uses the sizes of the very features it is given, eager or compiled, and
``forward_intermediates`` / ``features_only`` / ``output_hidden_states`` return features on the
full patch grid, each patch carrying the feature of the token that holds it.
"""

import copy

import pytest
import timm
import torch

import imagepiece
from conftest import make_family, tiny_vit
from imagepiece.coherence import ResidualCoherence


def images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


REDUCING = [("tome", dict(r=4)), ("evit", dict(keep_rate=0.5)), ("imagepiece", dict(keep_rate=0.5)),
            ("imagepiece-discard", dict(keep_rate=0.5))]


# ---------------------------------------------------------------------------------------
# Issue 22, item 3: sizes belong to the features they describe
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("pool", ["avg", "avgmax"])
def test_two_step_pools_features_with_their_own_sizes(pool):
    """forward_features(x1); forward_features(x2); forward_head(f1) is model(x1)."""
    model = imagepiece.patch(tiny_vit(global_pool=pool, class_token=False), "tome", r=4)
    x1, x2 = images(seed=1), images(seed=2)
    with torch.no_grad():
        f1 = model.forward_features(x1)
        model.forward_features(x2)
        assert torch.equal(model.forward_head(f1), model(x1))
        model.imagepiece.plan = "evit"  # a later plan change does not re-describe f1 either
        model(x2)
        model.imagepiece.plan = imagepiece.make_plan("tome", 6, r=4)
        assert torch.equal(model.forward_head(f1), model(x1))


def test_untagged_tokens_of_a_reducing_plan_are_refused():
    model = imagepiece.patch(tiny_vit(global_pool="avg", class_token=False), "tome", r=4)
    with torch.no_grad():
        feats = model.forward_features(images())
        with pytest.raises(ValueError, match="sizes are unknown"):
            model.forward_head(feats.clone())
        model.imagepiece.plan = "none"  # unreduced: untagged tokens are single patches
        plain = model.forward_features(images())
        assert torch.equal(model.forward_head(plain.clone()), model(images()))


def test_compiled_avg_pool_after_plan_switch_agrees_with_eager():
    """A compiled forward never pools with sizes left behind by an earlier eager call."""
    model = imagepiece.patch(tiny_vit(global_pool="avg", class_token=False), "evit",
                             keep_rate=0.5, blocks=(1,))  # 32 kept + fused: 33 tokens with sizes
    x = images()
    discard = imagepiece.make_plan("evit", 6, keep_rate=33 / 64, blocks=(1,), fuse=False)  # 33, no sizes
    with torch.no_grad():
        reference = imagepiece.patch(copy.deepcopy(model), discard)(x)
        model(x)  # eager call under the fusing plan
        model.imagepiece.plan = discard
        torch._dynamo.reset()
        compiled = torch.compile(model, backend="aot_eager")(x)
        two_step = torch.compile(model.forward_features, backend="aot_eager")(x)
        head = model.forward_head(two_step)
    torch.testing.assert_close(compiled, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head, reference, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# timm forward_intermediates on the full grid
# ---------------------------------------------------------------------------------------

CALLS = [dict(), dict(output_fmt="NLC", norm=True), dict(indices=2, return_prefix_tokens=True),
         dict(indices=[0, 3], intermediates_only=True, stop_early=True),
         dict(output_dict=True, return_prefix_tokens=True, norm=True)]


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return len(a) == len(b) and all(_same(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize("family", ["deit_distilled", "registers_gap", "no_class_token", "dynamic_size"])
def test_zero_reduction_returns_the_unpatched_intermediates_exactly(family):
    model, size = make_family(family)
    x = images(size=size)
    with torch.no_grad():
        refs = [model.forward_intermediates(x, **kw) for kw in CALLS]
        for plan, kw in [("none", {}), ("tome", dict(r=0)), ("evit", dict(keep_rate=1.0))]:
            imagepiece.patch(model, plan, **kw)
            for call, ref in zip(CALLS, refs, strict=True):
                assert _same(model.forward_intermediates(x, **call), ref), (plan, call)


@pytest.mark.parametrize("plan, kw", REDUCING)
def test_grid_features_are_the_features_of_the_holding_token(plan, kw):
    """Each patch gets the feature of the token its source map puts it in: a merged group's
    members share one feature, EViT's fused token covers the patches it absorbed."""
    model = imagepiece.patch(tiny_vit(reg_tokens=2), plan, **kw)
    model.imagepiece.record(sources=True)
    with torch.no_grad():
        final, inter = model.forward_intermediates(images(), output_fmt="NLC", norm=True)
    source = model.imagepiece.trace[-1].source[:, 3:]  # (B, tokens, patches), prefix rows dropped
    held = source.sum(1) > 0
    expected = torch.einsum("bnp,bnc->bpc", source, final[:, 3:])
    assert torch.equal(inter[-1][held], expected[held])
    assert (inter[-1][~held] == 0).all()  # discard plans: no token holds the patch
    groups = (source.sum(-1) > 1).nonzero()
    assert len(groups) > 0
    for b, n in groups.tolist():  # every member of a group has the same feature
        members = inter[-1][b, source[b, n] > 0]
        assert torch.equal(members, members[:1].expand_as(members))
    assert len(inter) == 6 and all(t.shape == (2, 64, 48) for t in inter)


def test_pruned_patches_get_fused_last_or_zeros():
    model = imagepiece.patch(tiny_vit(), "evit", keep_rate=0.5, blocks=(2,), fuse=True)
    model.imagepiece.record(sources=True)
    x = images()
    with torch.no_grad():
        grids = {p: model.forward_intermediates(x, output_fmt="NLC", pruned=p)[1]
                 for p in ("fused", "last", "zeros")}
    fused_src = model.imagepiece.trace[2].source[:, -1, :] > 0  # patches EViT fused at block 2
    kept = ~fused_src
    assert fused_src.any() and kept.any()
    for p in ("last", "zeros"):  # kept patches are the same whatever the rule; blocks 0-1 too
        assert torch.equal(grids[p][-1][kept], grids["fused"][-1][kept])
        assert all(torch.equal(grids[p][i], grids["fused"][i]) for i in (0, 1))
    assert (grids["zeros"][-1][fused_src] == 0).all()
    for b in range(2):  # one fused token per image for all the patches it absorbed
        fused = grids["fused"][-1][b][fused_src[b]]
        assert torch.equal(fused, fused[:1].expand_as(fused))
    last = grids["last"][2][fused_src]
    assert (last != 0).any(dim=-1).all() and not torch.equal(last, grids["fused"][2][fused_src])
    assert torch.equal(grids["last"][2][fused_src], grids["last"][-1][fused_src])  # frozen once dropped
    with pytest.raises(ValueError, match="pruned='nearest'"):
        model.forward_intermediates(x, pruned="nearest")


def test_intermediates_are_paid_for_only_when_asked():
    """The classification forward records no per-patch state; intermediates do not change it."""
    model = imagepiece.patch(tiny_vit(global_pool="avg", class_token=False), "imagepiece", keep_rate=0.5)
    x = images()
    with torch.no_grad():
        logits = model(x)
        final, _ = model.forward_intermediates(x)
        assert torch.equal(model.forward_head(final), logits)
        assert not hasattr(model.imagepiece, "last_size")


def test_truncated_model_and_features_only():
    """timm's features_only wrapper prunes blocks after the last index; registered models keep
    the coherence bias where the patch embedding is."""
    net = timm.create_model("imagepiece_vit_tiny_patch16_224", features_only=True, img_size=64,
                            patch_size=8, depth=6, out_indices=(1, 3), keep_rate=0.5)
    assert isinstance(net.model.patch_embed.proj, ResidualCoherence)
    assert len(net.model.blocks) == 4 and net.model.imagepiece.plan.name == "imagepiece"
    with torch.no_grad():
        feats = net(images())
        whole = timm.create_model("imagepiece_vit_tiny_patch16_224", img_size=64, patch_size=8,
                                  depth=6, keep_rate=0.5)
        whole.load_state_dict(net.model.state_dict(), strict=False)
        _, ref = whole.forward_intermediates(images(), indices=(1, 3))
    assert [tuple(f.shape) for f in feats] == [(2, 192, 8, 8)] * 2
    assert all(torch.equal(a, b) for a, b in zip(feats, ref, strict=True))
    with pytest.raises(ValueError, match="feature_cls='hook'"):
        timm.create_model("imagepiece_vit_tiny_patch16_224", features_only=True, feature_cls="hook")


def test_visualize_features_colour_merged_groups_alike():
    """`imagepiece visualize --features`: the unmerged feature map beside the partition; a
    merged group's patches share one colour."""
    from imagepiece.vis import trace_image

    model = tiny_vit()
    view = trace_image(model, images(n=1), "tome:r=8", [1, 4], features=True)
    for bv in view.blocks:
        assert bv.features.shape == (8, 8, 3) and 0 <= bv.features.min() and bv.features.max() <= 1
        labels = bv.labels.reshape(-1)
        colours = bv.features.reshape(-1, 3)
        for j in set(labels.tolist()):
            assert (colours[labels == j] == colours[labels == j][0]).all()
        assert len({tuple(c) for c in colours.tolist()}) == len(set(labels.tolist()))


# ---------------------------------------------------------------------------------------
# transformers output_hidden_states on the full grid
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["vit", "deit_teacher", "dinov2", "dinov2_registers", "clip"])
def test_hidden_states_on_the_full_grid(family):
    pytest.importorskip("transformers")
    from test_hf import FAMILIES, make
    from test_hf import images as hf_images

    model = make(family)
    x = hf_images(n=2)
    P = FAMILIES[family][1]
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
        imagepiece.patch(model, "none")
        same = model(x, output_hidden_states=True).hidden_states
        assert len(same) == len(ref) and all(torch.equal(a, b) for a, b in zip(same, ref, strict=True))
        model.imagepiece.plan = "tome"
        model.imagepiece.record(sources=True)
        states = model(x, output_hidden_states=True).hidden_states
        trace = model.imagepiece.trace
    assert [tuple(s.shape) for s in states] == [tuple(s.shape) for s in ref]
    assert torch.equal(states[0], ref[0])  # the embeddings are not reduced
    for layer in (2, 5):
        src = trace[layer].source[:, P:]  # (B, tokens, patches)
        grid = states[layer + 1][:, P:]
        for b, n in (src.sum(-1) > 1).nonzero().tolist():
            members = grid[b, src[b, n] > 0]
            assert torch.equal(members, members[:1].expand_as(members))
    with pytest.raises(ValueError, match="output_attentions"):
        model(x, output_attentions=True)


def test_torchscript_is_refused_clearly():
    model = imagepiece.patch(tiny_vit(depth=2), "tome", r=2)
    with pytest.raises(TypeError, match="TorchScript is not supported"):
        torch.jit.script(model)
    torch.jit.script(imagepiece.unpatch(model))  # the unpatched model scripts as before
