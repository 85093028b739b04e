import math

import pytest
import timm
import torch
import torch.nn as nn

import imagepiece
from conftest import make_family, tiny_vit
from imagepiece import Merge, Prune, ReductionPlan, Retokenize

ZERO_PLANS = [("none", {}), ("tome", dict(r=0)), ("evit", dict(keep_rate=1.0)),
              ("imagepiece", dict(keep_rate=1.0)), ("imagepiece+tome", dict(r=0))]
REDUCING = [("tome", dict(r=4)), ("evit", dict(keep_rate=0.6)), ("imagepiece", dict(keep_rate=0.6)),
            ("imagepiece+tome", dict(r=4)), ("imagepiece-discard", dict(keep_rate=0.6))]


def images(size, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ---------------------------------------------------------------------------------------
# Coverage and invariants on every family
# ---------------------------------------------------------------------------------------


def test_zero_reduction_reproduces_logits(family):
    model, size = make_family(family)
    x = images(size)
    with torch.no_grad():
        ref = model(x)
        for plan, kw in ZERO_PLANS:
            imagepiece.patch(model, plan, **kw)
            assert (model(x) - ref).abs().max() <= 1e-5, (family, plan)
        imagepiece.unpatch(model)
        assert type(model).__module__.startswith("timm")
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("plan, kw", REDUCING)
def test_reducing_plans_run_on_every_family(family, plan, kw):
    model, size = make_family(family)
    imagepiece.patch(model, plan, **kw).imagepiece.record(sources=True, scores=True)
    x = images(size, n=2)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    ctl = model.imagepiece
    P = ctl.num_prefix
    n = (size // model.patch_embed.patch_size[0]) ** 2
    counts = ctl.token_counts(P + n)
    trace = ctl.trace
    assert [t.tokens_out for t in trace] == [c[1] for c in counts]
    assert trace[-1].tokens_out < P + n
    last = trace[-1]
    src = last.source
    assert src.shape == (2, last.tokens_out, n)
    assert (src[:, :P] == 0).all()  # prefix tokens stand for no patch and stay in front
    cover = src.sum(1)
    if plan == "imagepiece-discard":
        assert (cover <= 1).all()  # kept groups are disjoint; dropped patches are uncovered
        assert (cover == 0).any()
    else:
        assert (cover == 1).all()  # a partition of the patches
        assert torch.allclose(last.size[:, P:].sum(1), torch.full((2,), float(n)))
        # a token's size is the number of patches it stands for
        assert torch.allclose(last.size[:, P:], src[:, P:].sum(-1))


def test_batch_independence_and_determinism(family):
    model, size = make_family(family)
    x = images(size, n=4)
    for plan, kw in REDUCING:
        imagepiece.patch(model, plan, **kw)
        with torch.no_grad():
            batch = model(x)
            single = torch.cat([model(x[i:i + 1]) for i in range(4)])
            again = model(x)
        assert torch.allclose(batch, single, atol=1e-5), (family, plan)
        assert torch.equal(batch, again)


def test_full_size_deit_models_and_golden_trace():
    x = images(224, n=1)
    for name, dist in [("deit_tiny_patch16_224", 0), ("deit_small_patch16_224", 0),
                       ("deit_base_patch16_224", 0), ("deit_small_distilled_patch16_224", 1)]:
        torch.manual_seed(0)
        model = timm.create_model(name).eval()
        with torch.no_grad():
            ref = model(x)
            imagepiece.patch(model, "none")
            assert (model(x) - ref).abs().max() <= 1e-5
            imagepiece.patch(model, "evit", keep_rate=0.7)
            model(x)
            fused = [t.tokens_out - 1 - dist for t in model.imagepiece.trace]
            assert fused == [196, 196, 196, 139, 139, 139, 99, 99, 99, 71, 71, 71]
            imagepiece.patch(model, "tome", r=13)
            model(x)
            assert model.imagepiece.trace[-1].tokens_out == 41 + dist
        if name != "deit_small_patch16_224":
            del model


# ---------------------------------------------------------------------------------------
# Exactness against straightforward reference implementations written from docs/methods.md
# ---------------------------------------------------------------------------------------


def _ref_attention(blk, x, size=None):
    """Unfused attention with the whole N x N map (log-size bias on keys, docs/methods.md)."""
    attn = blk.attn
    B, N, C = x.shape
    qkv = attn.qkv(blk.norm1(x)).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    q, k = attn.q_norm(q), attn.k_norm(k)
    logits = (q * attn.scale) @ k.transpose(-2, -1)
    if size is not None:
        logits = logits + size.log()[:, None, None, :]
    a = logits.softmax(-1)
    out = attn.proj((a @ v).transpose(1, 2).reshape(B, N, C))
    return x + blk.ls1(out), a, k


def _ref_tome_forward(model, x, r, prop_attn=True):
    """ToMe per docs/methods.md, ToMe, one image at a time with Python lists."""
    dist = getattr(model, "dist_token", None) is not None
    x = model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))
    outs = []
    for b in range(x.shape[0]):
        t = x[b:b + 1]
        size = torch.ones(1, t.shape[1])
        for blk in model.blocks:
            t, _, k = _ref_attention(blk, t, size if prop_attn else None)
            N = t.shape[1]
            rr = min(r, (N - 1 - dist) // 2)
            metric = k.mean(1)[0]
            metric = metric / metric.norm(dim=-1, keepdim=True)
            A, Bs = list(range(0, N, 2)), list(range(1, N, 2))
            sim = metric[A] @ metric[Bs].T
            sim[0, :] = -math.inf
            if dist:
                sim[:, 0] = -math.inf
            best, best_j = sim.max(-1)
            order = sorted(range(len(A)), key=lambda i: -best[i].item())
            merged = set(order[:rr])
            feats = {j: t[0, Bs[j]] * size[0, Bs[j]] for j in range(len(Bs))}
            sizes = {j: size[0, Bs[j]].clone() for j in range(len(Bs))}
            for i in merged:
                j = best_j[i].item()
                feats[j] = feats[j] + t[0, A[i]] * size[0, A[i]]
                sizes[j] = sizes[j] + size[0, A[i]]
            unm = sorted(i for i in range(len(A)) if i not in merged)
            rows = [t[0, A[i]] for i in unm]
            szs = [size[0, A[i]] for i in unm]
            brows = [feats[j] / sizes[j] for j in range(len(Bs))]
            bsz = [sizes[j] for j in range(len(Bs))]
            if dist:  # the distillation token is put back at index 1
                rows = rows[:1] + brows[:1] + rows[1:] + brows[1:]
                szs = szs[:1] + bsz[:1] + szs[1:] + bsz[1:]
            else:
                rows, szs = rows + brows, szs + bsz
            t = torch.stack(rows)[None]
            size = torch.stack(szs)[None]
            t = t + blk.ls2(blk.mlp(blk.norm2(t)))
        outs.append(model.forward_head(model.norm(t)))
    return torch.cat(outs)


def _ref_evit_forward(model, x, keep_rate, blocks, fuse=True):
    """EViT per docs/methods.md, EViT with torch.topk and the full attention map."""
    x = model.norm_pre(model._pos_embed(model.patch_embed(x)))
    for i, blk in enumerate(model.blocks):
        x, a, _ = _ref_attention(blk, x)
        if i in blocks:
            N = x.shape[1]
            k = math.ceil(keep_rate * (N - 1))
            if k < N - 1:
                cls_attn = a[:, :, 0, 1:].mean(1)
                w, idx = cls_attn.topk(k, dim=1, largest=True, sorted=True)
                non_cls = x[:, 1:]
                kept = non_cls.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
                parts = [x[:, :1], kept]
                if fuse:
                    mask = torch.ones_like(cls_attn, dtype=torch.bool).scatter(1, idx, False)
                    dropped = non_cls[mask].view(x.shape[0], -1, x.shape[-1])
                    dw = cls_attn[mask].view(x.shape[0], -1, 1)
                    parts.append((dropped * dw).sum(1, keepdim=True))
                x = torch.cat(parts, 1)
        x = x + blk.ls2(blk.mlp(blk.norm2(x)))
    return model.forward_head(model.norm(x))


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224"])
@pytest.mark.parametrize("r", [3, 40])
def test_tome_matches_reference(name, r):
    model = tiny_vit(name=name, depth=4)
    x = images(64, n=2)
    with torch.no_grad():
        ref = _ref_tome_forward(model, x, r)
        imagepiece.patch(model, "tome", r=r)
        out = model(x)
    assert (out - ref).abs().max() <= 1e-5


@pytest.mark.parametrize("fuse", [True, False])
def test_evit_matches_reference(fuse):
    model = tiny_vit(name="deit_tiny_patch16_224", depth=6)
    x = images(64, n=3)
    with torch.no_grad():
        ref = _ref_evit_forward(model, x, 0.7, (1, 3, 5), fuse)
        imagepiece.patch(model, "evit", keep_rate=0.7, blocks=(1, 3, 5), fuse=fuse)
        out = model(x)
    assert (out - ref).abs().max() <= 1e-5


def test_published_checkpoint_layout_loads_into_patched_model(tmp_path):
    """Official ToMe/EViT releases store a DeiT state dict under a 'model' key; patching does
    not rename parameters, so such a dict loads strictly and gives the patched behaviour."""
    source = tiny_vit(name="deit_tiny_patch16_224", depth=4)
    path = tmp_path / "release.pth"
    torch.save({"model": source.state_dict(), "epoch": 29}, path)
    target = imagepiece.patch(tiny_vit(name="deit_tiny_patch16_224", depth=4), "evit",
                              keep_rate=0.7, blocks=(1, 2))
    with torch.no_grad():
        for p in target.parameters():
            p.zero_()
    target.load_state_dict(torch.load(path, weights_only=True)["model"], strict=True)
    x = images(64, n=2)
    with torch.no_grad():
        assert (target(x) - _ref_evit_forward(source, x, 0.7, (1, 2))).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------
# Plan changes, training, pooling
# ---------------------------------------------------------------------------------------


def test_change_plan_without_repatching():
    model = tiny_vit()
    x = images(64)
    with torch.no_grad():
        ref = model(x)
        imagepiece.patch(model, "tome", r=8)
        reduced = model(x)
        model.imagepiece.plan = "none"
        assert (model(x) - ref).abs().max() <= 1e-5
        model.imagepiece.plan = imagepiece.make_plan("tome", depth=6, r=8)
        assert torch.equal(model(x), reduced)
        imagepiece.patch(model, "evit", keep_rate=0.5)
        assert model.imagepiece.plan.name == "evit"


def test_custom_plan_with_all_ops():
    plan = ReductionPlan((Merge(4), Retokenize(nonsemantic_share=0.4), Prune(0.5),
                          Retokenize(r=3, locality=0.0), None, Prune(0.8, fuse=False)))
    model = imagepiece.patch(tiny_vit(), plan)
    with torch.no_grad():
        out = model(images(64))
    assert torch.isfinite(out).all()
    assert [t.kind for t in model.imagepiece.trace][:4] == ["merge", "retokenize", "prune", "retokenize"]


@pytest.mark.parametrize("plan, kw", REDUCING)
def test_training_gradients_flow(plan, kw):
    model = tiny_vit(name="deit3_small_patch16_224", embed_dim=48, drop_path_rate=0.1)
    imagepiece.add_coherence(model, "residual")
    imagepiece.patch(model, plan, **kw).train()
    x = images(64, n=4)
    loss = model(x).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None for g in grads.values())
    # the zero-initialised coherence output layer gets a gradient, so it learns
    assert grads["patch_embed.proj.branch.out.weight"].abs().sum() > 0
    assert grads["blocks.5.mlp.fc2.weight"].abs().sum() > 0


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for ckpt in (False, True):
        model = imagepiece.patch(tiny_vit(), "imagepiece", keep_rate=0.6).train()
        model.set_grad_checkpointing(ckpt)
        model(images(64, n=2)).sum().backward()
        grads.append(model.blocks[0].attn.qkv.weight.grad)
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_autocast_bfloat16_runs():
    model = imagepiece.patch(tiny_vit(), "imagepiece", keep_rate=0.6)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images(64))
    assert torch.isfinite(out.float()).all()


def test_avg_pool_weights_tokens_by_size():
    model = tiny_vit(class_token=False, global_pool="avg", depth=2)
    plan = ReductionPlan((Merge(16),))
    imagepiece.patch(model, plan)
    x = images(64, n=2)
    with torch.no_grad():
        out = model.forward_features(x)
        size = model.imagepiece.trace[-1].size
        pooled = (out * size[..., None]).sum(1) / size.sum(1, keepdim=True)
        expected = model.head(model.fc_norm(pooled))
        assert torch.allclose(model(x), expected, atol=1e-6)
        assert not torch.allclose(model(x), model.head(model.fc_norm(out.mean(1))), atol=1e-4)


# ---------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------


def test_unsupported_models_raise_type_error():
    with pytest.raises(TypeError, match="supported"):
        imagepiece.patch(nn.Linear(3, 3), "tome")
    eva = timm.create_model("vit_small_patch16_18x2_224", img_size=32, depth=2)
    with pytest.raises(TypeError, match="supported"):
        imagepiece.patch(eva, "tome")
    with pytest.raises(TypeError, match="map"):
        imagepiece.patch(tiny_vit(global_pool="map"), "tome")


def test_wrong_image_size():
    model = imagepiece.patch(tiny_vit(), "tome", r=2)
    with pytest.raises(ValueError, match="does not match"):
        model(images(96))
    dyn = imagepiece.patch(tiny_vit(dynamic_img_size=True), "tome", r=2)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        dyn(images(70))


def test_bad_knobs_through_patch():
    model = tiny_vit()
    with pytest.raises(ValueError, match="keep_rate=0"):
        imagepiece.patch(model, "evit", keep_rate=0)
    with pytest.raises(ValueError, match="out of range"):
        imagepiece.patch(model, "evit", blocks=(2, 6))
    with pytest.raises(ValueError, match="r=-2"):
        imagepiece.patch(model, "tome", r=-2)
    assert not imagepiece.is_patched(model)


# ---------------------------------------------------------------------------------------
# timm's other entry points, copying and pickling (issue 14, items 3 and 12)
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan, kw", REDUCING)
@pytest.mark.parametrize("pool", ["avg", "avgmax", "token"])
def test_two_step_api_agrees_with_forward(plan, kw, pool):
    """forward_head(forward_features(x)) pools by size exactly as model(x) does."""
    model = imagepiece.patch(tiny_vit(global_pool=pool, class_token=pool == "token"), plan, **kw)
    x = images(64, n=2)
    with torch.no_grad():
        direct = model(x)
        two_step = model.forward_head(model.forward_features(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert (direct - two_step).abs().max() <= 1e-6
    assert torch.allclose(model.head(pre), direct, atol=1e-6)


def test_forward_head_refuses_tokens_of_unknown_size():
    model = imagepiece.patch(tiny_vit(global_pool="avg", class_token=False), "tome", r=4)
    with torch.no_grad():
        feats = model.forward_features(images(64, n=2))
        with pytest.raises(ValueError, match="sizes are unknown"):
            model.forward_head(feats[:, :-1])


def test_forward_intermediates_on_a_reducing_plan():
    """Every block on the full grid whatever the plan (tests/test_backbone.py pins the values)."""
    model = imagepiece.patch(tiny_vit(), "evit", keep_rate=0.5)
    final, inter = model.forward_intermediates(images(64))
    assert len(inter) == len(model.blocks) and all(t.shape == (3, 48, 8, 8) for t in inter)


@pytest.mark.parametrize("plan, kw", REDUCING)
def test_trace_is_detached_and_model_deep_copies(plan, kw):
    import copy

    model = imagepiece.patch(tiny_vit(), plan, **kw).train()
    model.imagepiece.record(sources=True, scores=True)
    model(images(64, n=2)).sum().backward()
    for rec in model.imagepiece.trace:
        for t in (rec.size, rec.source, rec.scores, rec.patch_scores, rec.merged_similarity):
            assert t is None or t.grad_fn is None
    clone = copy.deepcopy(model).eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(clone(images(64)), model(images(64)))


def test_patched_model_pickles(tmp_path):
    import pickle

    model = imagepiece.patch(tiny_vit(), "imagepiece", keep_rate=0.6)
    with torch.no_grad():
        ref = model(images(64))
    back = pickle.loads(pickle.dumps(model))
    assert imagepiece.is_patched(back) and type(back) is type(model)
    assert back.imagepiece.plan == model.imagepiece.plan
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(back(images(64)), ref) and torch.equal(loaded(images(64)), ref)
    assert type(imagepiece.unpatch(back)).__module__.startswith("timm")


def test_class_attention_ranks_in_float32():
    """Scores stay fp32 under bf16 so near-equal scores do not collapse into ties: logits 0.1%
    apart (distinct in bf16) give strictly ordered scores, which bf16 probabilities (ulp about
    0.4%) would tie. Caught mutation: the softmax taken in the input dtype and cast up after."""
    q = torch.randn(2, 3, 10, 8).bfloat16()
    k = torch.randn(2, 3, 10, 8).bfloat16()
    scores = imagepiece.ops.class_attention(q, k, 8 ** -0.5, 1, True)
    assert scores.dtype == torch.float32
    n = 24
    q = torch.ones(1, 1, n + 1, 1, dtype=torch.bfloat16)
    k = (torch.arange(n + 1, dtype=torch.float32) * 1e-3).bfloat16().view(1, 1, n + 1, 1)
    assert k.unique().numel() == n + 1  # the logits themselves are distinct in bf16
    scores = imagepiece.ops.class_attention(q, k, 1.0, 1, True)[0]
    assert torch.all(scores[1:] > scores[:-1]), scores
