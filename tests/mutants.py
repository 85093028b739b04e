"""Check that the ImagePiece tests fail on deliberately broken implementations.

Run: ``python tests/mutants.py`` (about a minute). Each mutation is applied in-process by
monkeypatching, the tests that claim to catch it are run, and the script exits non-zero if
any of them still passes. Not collected by pytest (the name does not start with ``test_``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import sys

import pytest
import torch

import imagepiece
from imagepiece import coherence, ops, plan

HERE = os.path.dirname(os.path.abspath(__file__))
T = "tests/test_imagepiece.py::"
REF0, REF2 = T + "test_imagepiece_matches_reference[knobs0]", T + "test_imagepiece_matches_reference[knobs2]"


@contextlib.contextmanager
def setattr_(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def tome_over_all_tokens():
    def matching(metric, scores, num_prefix, m, r, *args, **kwargs):
        return ops.bipartite_matching(metric, r, num_prefix)
    return setattr_(ops, "retokenize_matching", matching)


def _wrap_retokenize(**forced):
    original = ops.retokenize_matching

    def matching(*args, **kwargs):
        names = ["metric", "scores", "num_prefix", "num_nonsemantic", "r", "positions", "locality",
                 "grid_extent", "pairs_only"]
        bound = dict(zip(names, args, strict=False)) | kwargs
        return original(**(bound | forced))
    return setattr_(ops, "retokenize_matching", matching)


def _preset(**forced):
    presets = dict(plan.PRESETS)
    presets["imagepiece"] = functools.partial(plan.PRESETS["imagepiece"], **forced)
    return setattr_(plan, "PRESETS", presets)


def size_norm_ignored():
    original = plan.ReductionPlan.resolve

    def resolve(self, *args):
        return tuple(dataclasses.replace(s, size_norm=False) for s in original(self, *args))
    return setattr_(plan.ReductionPlan, "resolve", resolve)


def fused_bias_ignored():
    original = plan.PRESETS["imagepiece"]

    def factory(depth, **kw):
        return dataclasses.replace(original(depth, **kw), fused_bias=True)
    presets = dict(plan.PRESETS, imagepiece=factory)
    return setattr_(plan, "PRESETS", presets)


def centroids_unweighted():
    """Grid centroids (the only merged tensor with 2 features) averaged without size weights."""
    original = ops.merge_weighted

    def merge(index, x, size):
        return original(index, x, None if x.shape[-1] == 2 else size)
    return setattr_(ops, "merge_weighted", merge)


def scores_in_input_dtype():
    """Class attention softmaxed in the input dtype (bf16 ties), cast to fp32 afterwards."""
    def class_attention(q, k, scale, num_prefix, has_class_token, bias=None):
        query = q[:, :, :1] if has_class_token else q.mean(dim=2, keepdim=True)
        logits = (query * scale) @ k.transpose(-2, -1)
        if bias is not None:
            logits = logits + bias
        return logits.softmax(dim=-1).float().mean(dim=1)[:, 0][:, num_prefix:]
    return setattr_(ops, "class_attention", class_attention)


class _PerPatchStem(torch.nn.Module):
    """Non-overlapping: one conv with kernel = stride = patch size."""

    def __init__(self, in_chans, embed_dim, patch_size):
        super().__init__()
        self.convs = torch.nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.out = torch.nn.Conv2d(embed_dim, embed_dim, 1)

    def forward(self, x):
        return self.out(self.convs(x))


MUTANTS = {
    "ToMe matching over all tokens": (tome_over_all_tokens, [
        T + "test_imagepiece_matches_reference", T + "test_only_non_semantic_tokens_are_merged",
        T + "test_semantic_tokens_leave_bit_identical"]),
    "locality ignored": (lambda: _wrap_retokenize(locality=0.0), [
        T + "test_locality_favours_nearby_merges", REF0]),
    "centroids not passed": (lambda: _wrap_retokenize(positions=None), [
        T + "test_locality_favours_nearby_merges"]),
    "pairs_only ignored": (lambda: _wrap_retokenize(pairs_only=False), [
        T + "test_pairs_only_forms_pairs_and_rounds_grow_them", REF2]),
    "compounding budget": (lambda: _preset(budget="compound"), [
        T + "test_budget_equals_evit_after_every_prune_block", REF0]),
    "size_norm ignored": (size_norm_ignored, [REF2]),
    "fused_bias ignored": (fused_bias_ignored, [REF2]),
    "non-overlapping coherence stem": (lambda: setattr_(coherence, "CoherenceStem", _PerPatchStem), [
        T + "test_coherence_bias_overlaps_patches"]),
    "centroids merged without sizes": (centroids_unweighted, [
        T + "test_centroids_of_groups_merged_twice_are_size_weighted"]),
    "class attention in bf16": (scores_in_input_dtype, [
        "tests/test_patch.py::test_class_attention_ranks_in_float32"]),
}


def main() -> int:
    os.chdir(os.path.dirname(HERE))
    survivors = []
    for name, (mutate, tests) in MUTANTS.items():
        for test in tests:
            with mutate():
                code = pytest.main(["-q", "-x", "-p", "no:cacheprovider", "--no-header", test])
            caught = code != 0
            print(f"{'caught ' if caught else 'MISSED '} {name:32s} {test.split('::')[1]}", flush=True)
            if not caught:
                survivors.append((name, test))
    with contextlib.redirect_stdout(sys.stderr):
        print(f"{len(survivors)} mutation/test pairs survived" if survivors else "every mutation was caught")
    return 1 if survivors else 0


if __name__ == "__main__":
    assert imagepiece.patch  # the package under test imports
    sys.exit(main())
