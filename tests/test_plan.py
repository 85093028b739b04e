import math
from dataclasses import replace

import pytest

from imagepiece import Merge, Prune, ReductionPlan, Retokenize, keep_rate_warmup, make_plan, tome_schedule


def patch_counts(plan, num_tokens=197, prefix=1, depth=12):
    """Total tokens (prefix included) after each block."""
    return [s.tokens_out for s in plan.resolve(depth, num_tokens, prefix)]


# docs/methods.md, ToMe golden values: final token count (timm ViT/DeiT, 224 px, 12 blocks).
@pytest.mark.parametrize("r, final", [(8, 101), ((8, -1.0), 106), ((8, -1), 106), ([16] * 4, 133),
                                      (13, 41)])
def test_tome_golden_counts(r, final):
    assert patch_counts(make_plan("tome", r=r))[-1] == final
    # one more each with a distillation token
    assert patch_counts(make_plan("tome", r=r), 198, 2)[-1] == final + 1


def test_tome_r_is_capped():
    assert patch_counts(make_plan("tome", r=150))[0] == 99
    assert patch_counts(make_plan("tome", r=150), 198, 2)[0] == 100


def test_tome_schedule_shapes():
    assert tome_schedule(3, 4) == [3, 3, 3, 3]
    assert tome_schedule([5, 2], 4) == [5, 2, 0, 0]
    assert tome_schedule((8, -1.0), 12)[0] == 16 and tome_schedule((8, -1.0), 12)[-1] == 0
    # an int inflection is still an inflection, not a two-block list
    assert tome_schedule((8, -1), 12) == tome_schedule((8, -1.0), 12)
    assert tome_schedule((8, 0), 12) == [8] * 12
    assert tome_schedule((8, 1), 12) == tome_schedule((8, 1.0), 12)
    with pytest.raises(ValueError, match="inflection=2"):
        tome_schedule((8, 2), 12)
    assert tome_schedule((8, 0.0), 12) == [8] * 12
    assert tome_schedule((8, 1.0), 12)[0] == 0 and tome_schedule((8, 1.0), 12)[-1] == 16


# docs/methods.md, EViT golden values: non-class tokens per block, DeiT-S 224, keep 0.7 at 3, 6, 9.
def test_evit_golden_counts():
    no_fuse = [c - 1 for c in patch_counts(make_plan("evit", keep_rate=0.7, fuse=False))]
    fused = [c - 1 for c in patch_counts(make_plan("evit", keep_rate=0.7))]
    assert no_fuse == [196, 196, 196, 138, 138, 138, 97, 97, 97, 68, 68, 68]
    assert fused == [196, 196, 196, 139, 139, 139, 99, 99, 99, 71, 71, 71]
    assert patch_counts(make_plan("evit", keep_rate=1.0)) == [197] * 12


EVIT_07_FUSED = [196, 196, 196, 139, 139, 139, 99, 99, 99, 71, 71, 71]


def test_imagepiece_default_counts():
    """The default budget: the keep rate counts the tokens that entered the re-tokenization
    block, so every prune block leaves EViT's golden counts (docs/methods.md)."""
    steps = make_plan("imagepiece").resolve(12, 197, 1)
    kinds = [s.kind for s in steps]
    assert kinds[2] == kinds[5] == kinds[8] == "retokenize"
    assert kinds[3] == kinds[6] == kinds[9] == "prune"
    # block 2: the next prune drops 196 - ceil(0.7*196) = 58 tokens: they form the
    # non-semantic set and half of them (29) merge.
    assert (steps[2].m, steps[2].r) == (58, 29)
    counts = [s.tokens_out - 1 for s in steps]
    assert counts == [196, 196, 167, 139, 139, 119, 99, 99, 85, 71, 71, 71]
    assert [counts[i] for i in (3, 6, 9)] == [EVIT_07_FUSED[i] for i in (3, 6, 9)]
    # the saving is only in the blocks between re-tokenization and pruning
    assert all(a <= b for a, b in zip(counts, EVIT_07_FUSED, strict=True))


@pytest.mark.parametrize("depth", [8, 12, 16])
@pytest.mark.parametrize("keep_rate", [0.3, 0.5, 0.7, 0.9])
def test_imagepiece_budget_equals_evit_after_every_prune(depth, keep_rate):
    evit = make_plan("evit", depth=depth, keep_rate=keep_rate).resolve(depth, 197, 1)
    ip = make_plan("imagepiece", depth=depth, keep_rate=keep_rate).resolve(depth, 197, 1)
    prunes = [i for i, s in enumerate(evit) if s.kind == "prune"]
    assert prunes and all(ip[i].kind == "prune" for i in prunes)
    assert [ip[i].tokens_out for i in prunes] == [evit[i].tokens_out for i in prunes]
    assert sum(s.tokens_in for s in ip) < sum(s.tokens_in for s in evit)


def test_compound_budget_is_an_option():
    counts = [s.tokens_out - 1 for s in make_plan("imagepiece", budget="compound").resolve(12, 197, 1)]
    assert counts == [196, 196, 167, 118, 118, 101, 72, 72, 62, 45, 45, 45]
    with pytest.raises(ValueError, match="budget='paper'"):
        make_plan("imagepiece", budget="paper")


def test_too_many_merges_for_the_budget_is_an_error():
    plan = ReductionPlan((Retokenize(nonsemantic_share=0.9), Prune(0.9)))
    with pytest.raises(ValueError, match="prune block 1 keeps"):
        plan.resolve(2, 65, 1)
    # the same plan under the compound budget counts after merging and runs
    assert replace(plan, budget="compound").resolve(2, 65, 1)[1].kind == "prune"


def test_imagepiece_rounds_grow_groups():
    steps = make_plan("imagepiece", rounds=2).resolve(12, 197, 1)
    assert [s.kind for s in steps] == ["none"] + ["retokenize", "retokenize", "prune"] * 3 + ["none"] * 2
    assert steps[2].tokens_in == steps[1].tokens_out
    # round two sizes its non-semantic set from what the prune will still drop
    assert (steps[1].m, steps[2].m) == (58, 29)
    assert [steps[i].tokens_out - 1 for i in (3, 6, 9)] == [139, 99, 71]


@pytest.mark.parametrize("depth, rounds, block", [(6, 2, 1), (12, 3, 6), (8, 2, 4)])
def test_rounds_that_cannot_be_placed_raise(depth, rounds, block):
    with pytest.raises(ValueError, match=f"rounds={rounds} cannot be placed before prune block {block}"):
        make_plan("imagepiece", depth=depth, rounds=rounds)


def test_rounds_and_retokenize_blocks_are_exclusive():
    with pytest.raises(ValueError, match="not both"):
        make_plan("imagepiece", rounds=1, retokenize_blocks=(2,))
    explicit = make_plan("imagepiece", retokenize_blocks=(1, 2, 5, 8))
    assert [i for i, op in enumerate(explicit.ops) if isinstance(op, Retokenize)] == [1, 2, 5, 8]


@pytest.mark.parametrize("knob", ["pairs_only", "size_norm", "fused_bias", "prop_attn"])
def test_boolean_knobs_accept_only_booleans(knob):
    assert make_plan("imagepiece", **{knob: True})
    with pytest.raises(ValueError, match=f"{knob}='maybe'"):
        make_plan("imagepiece", **{knob: "maybe"})


def test_scoring_knobs_reach_the_steps():
    steps = make_plan("imagepiece", size_norm=True, pairs_only=True).resolve(12, 197, 1)
    assert steps[2].size_norm and steps[2].pairs_only and steps[3].size_norm
    assert make_plan("imagepiece", fused_bias=False).fused_bias is False


def test_imagepiece_tome_matches_tome_counts():
    assert patch_counts(make_plan("imagepiece+tome", r=13)) == patch_counts(make_plan("tome", r=13))
    kinds = [s.kind for s in make_plan("imagepiece+tome").resolve(12, 197, 1)]
    assert kinds.count("retokenize") == 3 and kinds.count("merge") == 9


def test_zero_plans_are_identity():
    for plan in [make_plan("none"), make_plan("tome", r=0), make_plan("evit", keep_rate=1.0),
                 make_plan("imagepiece", keep_rate=1.0)]:
        assert all(s.kind == "none" for s in plan.resolve(12, 197, 1))


def test_with_keep_rate_and_keep_rate():
    plan = make_plan("imagepiece", keep_rate=0.5)
    assert plan.keep_rate == 0.5
    assert plan.with_keep_rate(0.9).keep_rate == 0.9
    assert make_plan("tome").keep_rate is None
    assert make_plan("tome").with_keep_rate(0.5) == make_plan("tome")


@pytest.mark.parametrize("kw", [dict(keep_rate=0.0), dict(keep_rate=1.5), dict(keep_rate=-0.1),
                                dict(keep_rate=True), dict(keep_rate="0.7")])
def test_bad_keep_rate(kw):
    with pytest.raises(ValueError, match="keep_rate"):
        make_plan("evit", **kw)


@pytest.mark.parametrize("r", [-1, 1.5, "3", True])
def test_bad_r(r):
    with pytest.raises(ValueError, match="r="):
        make_plan("tome", r=r)


def test_bad_blocks():
    with pytest.raises(ValueError, match="out of range"):
        make_plan("evit", blocks=(3, 12))
    with pytest.raises(ValueError, match="out of range"):
        ReductionPlan((None,) * 12 + (Merge(2),)).resolve(12, 197, 1)
    with pytest.raises(ValueError, match="overlap"):
        make_plan("imagepiece", blocks=(3, 6), retokenize_blocks=(2, 6))
    # adjacent prune blocks leave no room before the second: it prunes without re-tokenizing
    kinds = [s.kind for s in make_plan("imagepiece", depth=4).resolve(4, 65, 1)]
    assert kinds == ["retokenize", "prune", "prune", "prune"]


def test_bad_retokenize_shares():
    with pytest.raises(ValueError, match="nonsemantic_share"):
        Retokenize(nonsemantic_share=1.0)
    with pytest.raises(ValueError, match="merge_share"):
        Retokenize(merge_share=0.6)
    with pytest.raises(ValueError, match="merge_share"):
        Retokenize(merge_share=0.0)
    with pytest.raises(ValueError, match="locality"):
        Retokenize(locality=-1.0)
    with pytest.raises(ValueError, match="later Prune"):
        ReductionPlan((Retokenize(),)).resolve(12, 197, 1)


def test_unknown_plan_and_knob():
    with pytest.raises(ValueError, match="unknown plan 'fast'"):
        make_plan("fast")
    with pytest.raises(TypeError, match="keep_rate"):
        make_plan("tome", keep_rate=0.7)


def test_custom_plan_with_share():
    plan = ReductionPlan((None, Retokenize(nonsemantic_share=0.5), Prune(0.5, fuse=False)))
    steps = plan.resolve(3, 65, 1)
    assert (steps[1].m, steps[1].r) == (32, 16)
    assert steps[2].tokens_out == 1 + math.ceil(0.5 * 64)  # counted before merging (budget="evit")
    compound = replace(plan, budget="compound").resolve(3, 65, 1)
    assert compound[2].tokens_out == 1 + math.ceil(0.5 * 48)


def test_keep_rate_warmup():
    kw = dict(steps_per_epoch=10, target=0.7, shrink_start=2, shrink_epochs=4)
    assert keep_rate_warmup(0, **kw) == 1.0
    assert keep_rate_warmup(19, **kw) == 1.0
    assert keep_rate_warmup(20, **kw) == pytest.approx(1.0)
    assert keep_rate_warmup(40, **kw) == pytest.approx(0.85)  # halfway along the cosine
    assert keep_rate_warmup(60, **kw) == 0.7
    assert keep_rate_warmup(1000, **kw) == 0.7
    values = [keep_rate_warmup(s, **kw) for s in range(70)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_keep_rate_warmup_fractional_epochs():
    kw = dict(steps_per_epoch=10, target=0.5, shrink_start=0, shrink_epochs=0.5)
    assert keep_rate_warmup(0, **kw) == 1.0
    assert keep_rate_warmup(5, **kw) == 0.5  # half an epoch of cosine, then the target
    assert 0.5 < keep_rate_warmup(3, **kw) < 1.0


def vit_macs(plan, depth=12, tokens=197, dim=384):
    """Block MACs of a ViT under a plan: qkv, projection and attention on the tokens entering a
    block, the MLP (4x wide) on those leaving its reduction step."""
    steps = plan.resolve(depth, tokens, 1)
    return sum(4 * s.tokens_in * dim**2 + 2 * s.tokens_in**2 * dim + 8 * s.tokens_out * dim**2
               for s in steps)


def test_hyper_speed_presets_are_at_matched_compute():
    """The three hyper presets cost within 5% of each other on DeiT-S 224 (about 2.7x fewer
    MACs than the unmodified model), so their accuracies can be compared as they stand."""
    base = vit_macs(make_plan("none"))
    macs = {}
    for fast, default in [("imagepiece-hyper", "imagepiece"), ("evit-hyper", "evit"),
                          ("tome-hyper", "tome")]:
        plan = make_plan(fast)
        assert plan.name == fast
        macs[fast] = vit_macs(plan)
        assert macs[fast] < 0.75 * vit_macs(make_plan(default))
        assert 2.4 < base / macs[fast] < 3.0
    assert max(macs.values()) / min(macs.values()) < 1.05
    assert make_plan("imagepiece-hyper").keep_rate == 0.34
    assert make_plan("imagepiece-hyper", keep_rate=0.5).keep_rate == 0.5
