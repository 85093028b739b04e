"""Reduction plans: which operation runs in which block, presets and schedules.

A :class:`ReductionPlan` is a per-block list of operations (:class:`Merge` for ToMe,
:class:`Prune` for EViT, :class:`Retokenize` for ImagePiece). :meth:`ReductionPlan.resolve`
turns it into concrete integers for one input size. Token counts depend only on the input size
and the plan, never on image content, so batches stay rectangular and shapes stay static.
Method specs (``"evit:keep_rate=0.5"``), the text form of a preset and its knobs, are read and
written here too (:func:`parse_method`, :func:`format_method`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

__all__ = [
    "DEFAULT_LOCALITY",
    "Merge",
    "MethodError",
    "Prune",
    "PRESETS",
    "ReductionPlan",
    "Retokenize",
    "Step",
    "default_blocks",
    "format_method",
    "keep_rate_warmup",
    "knob_names",
    "make_plan",
    "parse_method",
    "tome_schedule",
]

#: Default weight of the locality term of ImagePiece matching (cosine minus
#: ``locality · distance / grid side``). Provisional until the Fashion-MNIST study tunes it.
DEFAULT_LOCALITY = 0.1


def _check_int(name: str, value, low: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed; expected an integer >= {low}")
    return value


def _check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} is not allowed; expected True or False")
    return value


def _check_keep_rate(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ValueError(f"keep_rate={value!r} is outside (0, 1]; expected 0 < keep_rate <= 1")
    return float(value)


@dataclass(frozen=True)
class Merge:
    """ToMe: merge the ``r`` most similar token pairs (bipartite soft matching), §3."""

    r: int

    def __post_init__(self):
        _check_int("r", self.r)


@dataclass(frozen=True)
class Prune:
    """EViT: keep ``ceil(keep_rate · n)`` patch tokens by class attention; fuse the rest, §4.

    ``n`` is the patch-token count entering the block, or, under the plan's default
    ``budget="evit"``, the count that entered the re-tokenization block(s) just before it, so a
    re-tokenized model keeps exactly as many tokens as EViT. ``size_norm`` ranks by class
    attention divided by token size (a merged group's score is otherwise roughly the sum of its
    parts); the fused token still weights the dropped tokens by their raw attention.
    """

    keep_rate: float
    fuse: bool = True
    size_norm: bool = False

    def __post_init__(self):
        _check_keep_rate(self.keep_rate)
        _check_bool("fuse", self.fuse)
        _check_bool("size_norm", self.size_norm)


@dataclass(frozen=True)
class Retokenize:
    """ImagePiece: merge similar, nearby non-semantic tokens among themselves, §5.

    The non-semantic set is the bottom ``m`` patch tokens by class attention, where ``m`` is
    - ``2 · r`` when ``r`` is given (``r`` merges, e.g. in place of a ToMe merge),
    - else ``round(nonsemantic_share · n)`` when that is given,
    - else EViT's drop count for the tokens entering this block: ``n - ceil(keep_rate · base)``
      with the next :class:`Prune`'s keep rate (``base`` = ``n`` here, or the count the plan's
      budget names; the paper's default). It is counted *before* merging: after the ``r``
      merges the prune drops ``m - r`` tokens (more under ``budget="compound"``, whose
      keep rate counts the tokens left after merging).
    It is split alternately into A and B and ``floor(merge_share · m)`` A tokens merge into
    their best B token. As in ToMe the matching is many-to-one: several A tokens may join one
    B token, so one round can form groups larger than two. ``pairs_only`` makes it one-to-one
    (each B token takes at most one A token, pairs chosen greedily by score), so one round
    forms pairs and every further round at most doubles a group. ``size_norm`` ranks tokens by
    class attention divided by size.
    """

    merge_share: float = 0.5
    nonsemantic_share: float | None = None
    r: int | None = None
    locality: float = DEFAULT_LOCALITY
    pairs_only: bool = False
    size_norm: bool = False

    def __post_init__(self):
        if not (isinstance(self.merge_share, (int, float)) and not isinstance(self.merge_share, bool)
                and 0 < self.merge_share <= 0.5):
            raise ValueError(
                f"merge_share={self.merge_share!r} is not allowed; expected 0 < merge_share <= 0.5 "
                "(only A tokens, half of the non-semantic set, can be merged away)"
            )
        _check_bool("pairs_only", self.pairs_only)
        _check_bool("size_norm", self.size_norm)
        share = self.nonsemantic_share
        if share is not None and not (isinstance(share, (int, float)) and 0 < share < 1):
            raise ValueError(
                f"nonsemantic_share={share!r} is not allowed; expected 0 < share < 1 "
                "(1 would leave no semantic token)"
            )
        if self.r is not None:
            _check_int("r", self.r)
        if not (isinstance(self.locality, (int, float)) and math.isfinite(self.locality)
                and self.locality >= 0):
            raise ValueError(f"locality={self.locality!r} is not allowed; expected a finite value >= 0")


Op = Merge | Prune | Retokenize

#: What a prune block's keep rate counts (see :class:`ReductionPlan`).
BUDGETS = ("evit", "compound")


@dataclass(frozen=True)
class Step:
    """One block's resolved operation, with its token counts (prefix tokens included)."""

    kind: Literal["none", "merge", "prune", "retokenize"]
    tokens_in: int
    tokens_out: int
    r: int = 0  # merges (merge, retokenize)
    k: int = 0  # kept patch tokens (prune)
    m: int = 0  # non-semantic set size (retokenize)
    fuse: bool = False
    locality: float = 0.0
    pairs_only: bool = False
    size_norm: bool = False  # rank by class attention / size

    @property
    def needs_scores(self) -> bool:
        return self.kind in ("prune", "retokenize")


@dataclass(frozen=True)
class ReductionPlan:
    """Per-block operations (``None`` = nothing; missing trailing blocks = nothing).

    ``prop_attn`` adds ``log(size)`` of each key to the attention logits wherever sizes differ
    from 1 (ToMe's proportional attention). ``fused_bias=False`` gives EViT's fused token no
    such bias (it enters attention as one token, as in EViT) while its size still counts the
    patches it absorbed. ``budget`` fixes what a :class:`Prune`'s keep rate counts:
    ``"evit"`` (default) the patch tokens that entered the first re-tokenization block (one
    without a fixed ``r``) since the previous prune, so token counts after every prune block
    equal EViT's;
    ``"compound"`` the tokens entering the prune block itself, after merging, so merges and
    pruning compound (fewer tokens than EViT at the same keep rate).
    """

    ops: tuple[Op | None, ...] = ()
    prop_attn: bool = True
    name: str = "custom"
    budget: Literal["evit", "compound"] = "evit"
    fused_bias: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ops", tuple(self.ops))
        if self.budget not in BUDGETS:
            raise ValueError(f"budget={self.budget!r} is not allowed; expected one of {BUDGETS}")
        _check_bool("prop_attn", self.prop_attn)
        _check_bool("fused_bias", self.fused_bias)
        for i, op in enumerate(self.ops):
            if op is not None and not isinstance(op, (Merge, Prune, Retokenize)):
                raise TypeError(f"ops[{i}]={op!r} is not a Merge, Prune, Retokenize or None")

    @property
    def is_identity(self) -> bool:
        return all(op is None or (isinstance(op, Merge) and op.r == 0) for op in self.ops)

    @property
    def keep_rate(self) -> float | None:
        """Keep rate of the first prune block, or None if the plan prunes nothing."""
        return next((op.keep_rate for op in self.ops if isinstance(op, Prune)), None)

    def with_keep_rate(self, keep_rate: float) -> ReductionPlan:
        """The same plan with every prune keep rate replaced (for the keep-rate warm-up)."""
        keep_rate = _check_keep_rate(keep_rate)
        ops = tuple(replace(op, keep_rate=keep_rate) if isinstance(op, Prune) else op
                    for op in self.ops)
        return replace(self, ops=ops)

    def resolve(self, depth: int, num_tokens: int, num_prefix: int) -> tuple[Step, ...]:
        """Concrete per-block steps for a model of ``depth`` blocks and ``num_tokens`` tokens."""
        if len(self.ops) > depth and any(op is not None for op in self.ops[depth:]):
            bad = [i for i, op in enumerate(self.ops) if op is not None and i >= depth]
            raise ValueError(f"blocks {bad} are out of range for a model with {depth} blocks "
                             f"(allowed 0..{depth - 1})")
        ops = list(self.ops[:depth]) + [None] * (depth - len(self.ops))
        steps: list[Step] = []
        n_tok = num_tokens
        base: int | None = None  # patch tokens entering the first re-tokenization since a prune
        for i, op in enumerate(ops):
            # A re-tokenization with a fixed r stands in for a ToMe merge and does not count.
            if isinstance(op, Retokenize) and op.r is None and base is None and self.budget == "evit":
                base = n_tok - num_prefix
            step = _resolve_op(op, i, ops, n_tok, num_prefix, base)
            if isinstance(op, Prune):
                base = None
            steps.append(step)
            n_tok = step.tokens_out
        return tuple(steps)


def _prune_keep(keep_rate: float, n: int) -> int:
    # Same float expression as EViT's release so published checkpoints see the same counts.
    return math.ceil(keep_rate * n)


def _resolve_op(op: Op | None, i: int, ops: list, n_tok: int, num_prefix: int,
                base: int | None) -> Step:
    """One block's step; ``base`` is the count a prune's keep rate applies to (None: ``n``)."""
    n = n_tok - num_prefix
    if op is None:
        return Step("none", n_tok, n_tok)
    if isinstance(op, Merge):
        r = min(op.r, n // 2)
        return Step("merge", n_tok, n_tok - r, r=r) if r > 0 else Step("none", n_tok, n_tok)
    if isinstance(op, Prune):
        return _resolve_prune(op, i, n_tok, num_prefix, n if base is None else base)
    return _resolve_retokenize(op, i, ops, n_tok, num_prefix, base)


def _resolve_prune(op: Prune, i: int, n_tok: int, num_prefix: int, base: int) -> Step:
    n = n_tok - num_prefix
    k = _prune_keep(op.keep_rate, base)
    if k > n:
        raise ValueError(
            f"prune block {i} keeps ceil({op.keep_rate}·{base}) = {k} tokens but only {n} remain "
            "after the re-tokenization before it; merge fewer tokens there or use budget='compound'"
        )
    if k == n:
        return Step("none", n_tok, n_tok)
    return Step("prune", n_tok, num_prefix + k + int(op.fuse), k=k, fuse=op.fuse,
                size_norm=op.size_norm)


def _resolve_retokenize(op: Retokenize, i: int, ops: list, n_tok: int, num_prefix: int,
                        base: int | None) -> Step:
    n = n_tok - num_prefix
    if op.r is not None:
        m = min(2 * op.r, n)
    elif op.nonsemantic_share is not None:
        m = round(op.nonsemantic_share * n)
    else:
        nxt = next((o for o in ops[i + 1:] if isinstance(o, Prune)), None)
        if nxt is None:
            raise ValueError(
                f"Retokenize at block {i} needs r, nonsemantic_share, or a later Prune block "
                "to size its non-semantic set"
            )
        # EViT's drop count for the tokens entering this block (before merging; the prune then
        # drops m - r of what is left), under the plan's budget.
        m = n - min(_prune_keep(nxt.keep_rate, n if base is None else base), n)
    r = m // 2 if op.r is not None else math.floor(op.merge_share * m)
    if r <= 0:
        return Step("none", n_tok, n_tok)
    return Step("retokenize", n_tok, n_tok - r, r=r, m=m, locality=float(op.locality),
                pairs_only=op.pairs_only, size_norm=op.size_norm)


# --------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------

RSchedule = int | Sequence[int] | tuple[int, float]


def tome_schedule(r: RSchedule, depth: int) -> list[int]:
    """ToMe's r per block: an int (every block), a list (zero-padded), or ``(r, inflection)``.

    With ``(r, inflection)`` (any 2-tuple; inflection an int or float in [-1, 1]): block i gets
    ``int(min + i·(max − min)/(depth − 1))`` with ``min = int(r·(1 − inflection))``,
    ``max = 2r − min`` (−1: decreasing from 2r to 0; 0: constant; 1: increasing).
    """
    if isinstance(r, tuple) and len(r) == 2:
        # A 2-tuple is always (r, inflection), whatever the inflection's number type: an int
        # inflection ("(8, -1)") must not be read as a two-block list.
        base, inflect = r
        _check_int("r", base)
        if isinstance(inflect, bool) or not isinstance(inflect, (int, float)) or not -1 <= inflect <= 1:
            raise ValueError(f"inflection={inflect!r} is not allowed; expected a number in [-1, 1] "
                             "(r schedules as (r, inflection); per-block values are a list, in a "
                             "method spec one that ends with ';': tome:r=4;4;)")
        lo = int(base * (1.0 - inflect))
        hi = 2 * base - lo
        step = (hi - lo) / (depth - 1) if depth > 1 else 0.0
        return [int(lo + step * i) for i in range(depth)]
    if isinstance(r, Sequence) and not isinstance(r, str):
        values = [_check_int("r", v) for v in r]
        if len(values) > depth:
            raise ValueError(f"r schedule has {len(values)} entries for a model with {depth} blocks")
        return values + [0] * (depth - len(values))
    return [_check_int("r", r)] * depth


def keep_rate_warmup(
    step: int, steps_per_epoch: int, target: float, shrink_start: float, shrink_epochs: float
) -> float:
    """EViT's keep-rate warm-up (§4.4): 1 for ``shrink_start`` epochs, then a cosine from 1 to
    ``target`` over ``shrink_epochs``, updated per iteration, then ``target``."""
    target = _check_keep_rate(target)
    _check_int("steps_per_epoch", steps_per_epoch, 1)
    start = shrink_start * steps_per_epoch
    length = shrink_epochs * steps_per_epoch
    if step < start:
        return 1.0
    if length <= 0 or step >= start + length:
        return target
    t = (step - start) / length
    return target + (1.0 - target) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------
# Presets
# --------------------------------------------------------------------------------------


def default_blocks(depth: int) -> tuple[int, ...]:
    """EViT's pruning blocks scaled to depth: 3, 6, 9 for 12 blocks."""
    return tuple(sorted({depth // 4, depth // 2, 3 * depth // 4}))


def _check_blocks(blocks: int | Sequence[int], depth: int, what: str) -> tuple[int, ...]:
    """Sorted, distinct, in-range block indices; a single int is one block."""
    if isinstance(blocks, int) and not isinstance(blocks, bool):
        blocks = (blocks,)
    if isinstance(blocks, str) or not isinstance(blocks, Sequence):
        raise ValueError(f"{what} blocks={blocks!r} is not allowed; expected a block index or a list "
                         "of them")
    blocks = tuple(blocks)
    for b in blocks:
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < depth:
            raise ValueError(f"{what} block {b!r} is out of range; allowed 0..{depth - 1}")
    if len(set(blocks)) != len(blocks):
        raise ValueError(f"{what} blocks {blocks} repeat a block")
    return tuple(sorted(blocks))


def _place(depth: int, entries: dict[int, Op]) -> tuple[Op | None, ...]:
    return tuple(entries.get(i) for i in range(depth))


def _none(depth: int) -> ReductionPlan:
    return ReductionPlan((), name="none")


def _tome(depth: int, r: RSchedule = 13, prop_attn: bool = True) -> ReductionPlan:
    rs = tome_schedule(r, depth)
    return ReductionPlan(tuple(Merge(v) if v else None for v in rs), prop_attn, name="tome")


def _evit(depth: int, keep_rate: float = 0.7, blocks: Sequence[int] | None = None,
          fuse: bool = True) -> ReductionPlan:
    blocks = _check_blocks(default_blocks(depth) if blocks is None else blocks, depth, "prune")
    return ReductionPlan(_place(depth, {b: Prune(keep_rate, fuse) for b in blocks}),
                         prop_attn=False, name="evit")


def _imagepiece(depth: int, keep_rate: float = 0.7, blocks: Sequence[int] | None = None,
                rounds: int | None = None, merge_share: float = 0.5,
                locality: float = DEFAULT_LOCALITY, prop_attn: bool = True,
                retokenize_blocks: Sequence[int] | None = None, pairs_only: bool = False,
                size_norm: bool = False, fused_bias: bool = True, budget: str = "evit",
                nonsemantic_share: float | None = None, _fuse: bool = True) -> ReductionPlan:
    """ImagePiece (``_fuse=False``: ``imagepiece-discard``, a preset of its own, so a plan's
    name always says whether the leftover tokens are fused)."""
    blocks = _check_blocks(default_blocks(depth) if blocks is None else blocks, depth, "prune")
    if retokenize_blocks is None:
        retokenize_blocks = _retokenize_blocks(blocks, rounds)
    elif rounds is not None:
        raise ValueError("give rounds or retokenize_blocks, not both")
    retok = _check_blocks(retokenize_blocks, depth, "retokenize")
    if set(retok) & set(blocks):
        raise ValueError(f"retokenize_blocks {retok} overlap prune blocks {blocks}")
    entries: dict[int, Op] = {b: Prune(keep_rate, _fuse, size_norm) for b in blocks}
    entries.update({b: Retokenize(merge_share=merge_share, nonsemantic_share=nonsemantic_share,
                                  locality=locality, pairs_only=pairs_only, size_norm=size_norm)
                    for b in retok})
    name = "imagepiece" if _fuse else "imagepiece-discard"
    return ReductionPlan(_place(depth, entries), prop_attn, name=name, budget=budget,
                         fused_bias=fused_bias)


def _retokenize_blocks(blocks: tuple[int, ...], rounds: int | None) -> list[int]:
    """The ``rounds`` blocks just before each prune block.

    A requested ``rounds`` must fit in the free blocks between the previous prune block (or
    the start) and each prune block, else ``ValueError``. With ``rounds=None`` (default) each
    prune block gets one round when a free block precedes it: in a model shallower than 8
    blocks, adjacent prune blocks (e.g. 3 and 4 of 6) leave the later one without one.
    """
    if rounds is not None:
        _check_int("rounds", rounds, 1)
    out: list[int] = []
    prev = -1
    for b in blocks:
        free = list(range(prev + 1, b))
        want = 1 if rounds is None else rounds
        if rounds is not None and len(free) < rounds:
            raise ValueError(
                f"rounds={rounds} cannot be placed before prune block {b}: only blocks {free} are "
                f"free after {'prune block ' + str(prev) if prev >= 0 else 'the start'}; "
                f"allowed rounds <= {len(free)} here, or pass retokenize_blocks"
            )
        out += free[len(free) - min(want, len(free)):]
        prev = b
    return out


def _imagepiece_tome(depth: int, r: RSchedule = 13, retokenize_blocks: Sequence[int] | None = None,
                     locality: float = DEFAULT_LOCALITY, prop_attn: bool = True) -> ReductionPlan:
    """ToMe whose merges, at the re-tokenization blocks, are restricted to the 2r least
    class-attended tokens (so semantic tokens are not diluted there); same token counts."""
    rs = tome_schedule(r, depth)
    if retokenize_blocks is None:
        retokenize_blocks = tuple(b - 1 for b in default_blocks(depth) if b >= 1)
    retok = set(_check_blocks(retokenize_blocks, depth, "retokenize"))
    ops = tuple(
        None if not v else (Retokenize(r=v, locality=locality) if i in retok else Merge(v))
        for i, v in enumerate(rs)
    )
    return ReductionPlan(ops, prop_attn, name="imagepiece+tome")


def _discard(depth: int, **kw) -> ReductionPlan:
    return _imagepiece(depth, _fuse=False, **kw)


PRESETS = {
    "none": _none,
    "tome": _tome,
    "evit": _evit,
    "imagepiece": _imagepiece,
    "imagepiece+evit": _imagepiece,
    "imagepiece-discard": _discard,
    "imagepiece+tome": _imagepiece_tome,
    # Hyper-speed settings (the paper's "hyper-speed" regime, about 2.5x the images/s), chosen
    # at matched compute: on DeiT-S 224 they count 1.72 (imagepiece keep 0.34), 1.72 (evit keep
    # 0.25) and 1.67 (tome (18, -0.5)) GMACs against 4.60 unreduced (`imagepiece bench`).
    "imagepiece-hyper": functools.partial(_imagepiece, keep_rate=0.34),
    "evit-hyper": functools.partial(_evit, keep_rate=0.25),
    "tome-hyper": functools.partial(_tome, r=(18, -0.5)),
}


def knob_names(plan: str) -> list[str]:
    """The knobs a preset takes, in its signature's order (``ValueError`` for an unknown name).

    A preset that forwards its knobs (``imagepiece-discard``) takes those of ``imagepiece``;
    ``functools.partial`` presets keep their bound knobs, which may be given again. Parameters
    starting with ``_`` are the preset's own business, not knobs."""
    if not isinstance(plan, str) or plan not in PRESETS:
        raise ValueError(f"unknown plan {plan!r}; allowed: {', '.join(PRESETS)}")
    params = inspect.signature(PRESETS[plan]).parameters
    if "kw" in params:  # a preset that forwards its knobs to another
        params = inspect.signature(_imagepiece).parameters
    return [p for p in params if p not in ("depth", "kw") and not p.startswith("_")]


def preset_knobs(name: str) -> dict[str, object]:
    """Knob name -> default value of the preset ``name`` (``fuse`` is the preset's own choice)."""
    factory = PRESETS[name]
    params = inspect.signature(factory).parameters
    if "kw" in params:  # a preset that forwards its knobs to another
        params = inspect.signature(_imagepiece).parameters
    return {k: p.default for k, p in params.items() if k not in ("depth", "kw", "fuse")}


def make_plan(plan: str | ReductionPlan | None, depth: int = 12, **kwargs) -> ReductionPlan:
    """A plan from a preset name and its knobs, or a given :class:`ReductionPlan` unchanged."""
    if plan is None:
        plan = "none"
    if isinstance(plan, ReductionPlan):
        if kwargs:
            raise TypeError(f"knobs {sorted(kwargs)} only apply to preset names, not a ReductionPlan")
        return plan
    if not isinstance(plan, str) or plan not in PRESETS:
        raise ValueError(f"unknown plan {plan!r}; allowed: {', '.join(PRESETS)} or a ReductionPlan")
    _check_int("depth", depth, 1)
    allowed = knob_names(plan)
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        hint = (" (the preset fixes fusing: 'imagepiece' fuses what it drops, 'imagepiece-discard' "
                "discards it)"
                if "fuse" in unknown and plan.startswith("imagepiece") else "")
        raise TypeError(f"plan {plan!r} got unexpected knobs {unknown}; allowed: {allowed}{hint}")
    made = PRESETS[plan](depth, **kwargs)
    return replace(made, name=plan) if made.name != plan else made


# --------------------------------------------------------------------------------------
# Method specs: "name" or "name:knob=value,knob=value"; list values separated by ";"
# --------------------------------------------------------------------------------------


class MethodError(ValueError):
    """A method spec that cannot be read (unknown preset, malformed knob)."""


def _parse_value(text: str) -> Any:
    """One knob value: a bool, ``None``, an int, a float or text; with ``;`` a tuple of them, or a
    list when the value ends with ``;`` (``4;`` is ``[4]``, ``4;4;`` is ``[4, 4]``)."""
    text = text.strip()
    if text.endswith(";"):
        return [_parse_value(p) for p in text.split(";") if p.strip()]
    if ";" in text:
        return tuple(_parse_value(p) for p in text.split(";") if p.strip())
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"evit:keep_rate=0.5"`` -> ``("evit", {"keep_rate": 0.5})``.

    Syntax: a preset name, optionally ``:`` and comma-separated ``knob=value`` pairs, each knob
    at most once; a list value separates its items with ``;`` (``imagepiece:blocks=1;4;7``). A
    value that *ends* with ``;`` is always a per-block list: ToMe's ``tome:r=16;-0.5`` is the
    ``(r, inflection)`` schedule, ``tome:r=4;4;`` is r=4 in blocks 0 and 1, ``tome:r=4;`` r=4 in
    block 0 only. Only the syntax is checked here (the knobs by :func:`make_plan`).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise MethodError(f"empty method spec {spec!r}; expected e.g. 'evit' or 'evit:keep_rate=0.5'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"unknown method {name!r} in {spec!r}{hint}; allowed: {', '.join(PRESETS)}")
    knobs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise MethodError(f"bad knob {item!r} in method {spec!r}; expected knob=value, "
                              "e.g. 'evit:keep_rate=0.5' or 'imagepiece:blocks=1;4;7'")
        key = key.strip()
        if key in knobs:
            raise MethodError(f"knob {key!r} is given twice in method {spec!r}; give each knob once")
        knobs[key] = _parse_value(value)
    return name, knobs


def format_method(name: str, knobs: dict[str, Any]) -> str:
    """The spec :func:`parse_method` reads back as the same knobs: ``("evit", {"keep_rate": 0.5})``
    -> ``"evit:keep_rate=0.5"``; a list ends with ``;`` (``[4]`` -> ``4;``), a tuple does not, so
    two different plans never share a label."""

    def fmt(v):
        if isinstance(v, list):
            return "".join(f"{x};" for x in v)
        return ";".join(map(str, v)) if isinstance(v, tuple) else str(v)
    return name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in knobs.items()) if knobs else "")


def split_spec(plan: Any, knobs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """``("tome:r=8", {})`` -> ``("tome", {"r": 8})``: a method spec in place of a plan, its knobs
    joined with ``knobs`` (a knob given both ways is an error). Other plans pass unchanged."""
    if not isinstance(plan, str) or ":" not in plan:
        return plan, dict(knobs)
    name, parsed = parse_method(plan)
    both = sorted(set(parsed) & set(knobs))
    if both:
        raise MethodError(f"knob(s) {both} given both in the spec {plan!r} and as keywords; give them once")
    return name, {**parsed, **knobs}
