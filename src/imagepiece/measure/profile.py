"""Where a reduced forward pass spends its time: ``torch.profiler`` with each part of the block
step labelled (``imagepiece bench --profile``, docs/benchmarks.md).

The labels are added only while :func:`profile_forward` runs, by wrapping the runtime's step
and the ops it calls, so the library itself carries no profiling code. Each row gives the
milliseconds per forward pass spent under a label (inclusive of the ops it launched) and how
many ATen operations it launched: at batch 1 on a CPU each operation costs a few microseconds
whatever its size, so the count is the overhead's noise-free measure.
"""

from __future__ import annotations

import contextlib
import functools
import random
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from .. import ops, runtime

__all__ = ["CLOCKS", "PARTS", "ProfileRow", "profile_forward", "wall_forward_parts"]

# The reduction's parts, each with the functions it times (looked up by name at call time).
_REDUCTION = {
    "scores": ((ops, "class_attention"),),
    "bias": ((ops, "proportional_bias"),),
    "matching": ((ops, "bipartite_matching"), (ops, "retokenize_matching")),
    "ranking": ((ops, "prune_select"),),
    "state": ((runtime, "_merge_state"), (runtime, "_prune_state")),
}
_BLOCK = ("attention", "mlp", "block")  # Layout.attend, Layout.mlp, Layout.whole
#: Row names in order: the block's own compute, the reduction's parts, then what is left.
PARTS = (*_BLOCK, *_REDUCTION, "step other", "outside blocks")
_STEP = "imagepiece.step"
#: ``profiler``: torch.profiler (times and ATen op counts, with the profiler's per-op cost);
#: ``wall``: wall-clock timers around the same parts (times only, interleaved across plans).
CLOCKS = ("profiler", "wall")


@dataclass
class ProfileRow:
    """One part of a forward pass: milliseconds per pass and ATen operations launched per pass
    (``None`` on the wall clock, which counts no operations)."""

    part: str
    ms: float
    ops: float | None

    @property
    def is_reduction(self) -> bool:
        return self.part not in (*_BLOCK, "outside blocks")


Span = Callable[[str], contextlib.AbstractContextManager]


class _LabelledLayout:
    """A family's layout whose block compute runs inside ``span(part)``."""

    def __init__(self, layout: runtime.Layout, span: Span):
        self._layout, self._span = layout, span

    def attend(self, blk, x, bias):
        with self._span("attention"):
            return self._layout.attend(blk, x, bias)

    def mlp(self, blk, x):
        with self._span("mlp"):
            return self._layout.mlp(blk, x)

    def whole(self, blk, x):
        with self._span("block"):
            return self._layout.whole(blk, x)

    def scale(self, blk):
        return self._layout.scale(blk)


def _labelled(label: str, fn: Callable, span: Span) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with span(label):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _labels(span: Span = record_function) -> Iterator[None]:
    """Run the step, the block compute and the reduction ops inside ``span(label)`` (profiler
    labels by default); restore them on exit."""
    saved = [(runtime, "_block_step", runtime._block_step)]
    step = runtime._block_step

    def labelled_step(layout, *args, **kwargs):
        with span(_STEP):
            return step(_LabelledLayout(layout, span), *args, **kwargs)

    runtime._block_step = labelled_step
    for label, places in _REDUCTION.items():
        for module, name in places:
            fn = getattr(module, name)
            saved.append((module, name, fn))
            setattr(module, name, _labelled(label, fn, span))
    try:
        yield
    finally:
        for module, name, fn in reversed(saved):
            setattr(module, name, fn)


def _owner(event, labels: set[str]) -> str | None:
    """The innermost label an event ran under (None: outside every label)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in labels:
            return parent.name
        parent = parent.cpu_parent
    return None


def _is_top_aten(event) -> bool:
    """An ATen operation the Python code called (not one launched inside another)."""
    parent = event.cpu_parent
    return event.name.startswith("aten::") and (parent is None or not parent.name.startswith("aten::"))


def _rows(events, runs: int) -> list[ProfileRow]:
    labels, reduction = {*_BLOCK, *_REDUCTION, _STEP}, set(_REDUCTION)
    anywhere = labels | {"forward"}
    ms = dict.fromkeys([*PARTS, _STEP, "forward"], 0.0)
    count = dict.fromkeys(ms, 0)
    for ev in events:
        if ev.name == "forward" and ev.cpu_parent is None:
            ms["forward"] += ev.cpu_time_total / 1e3
        elif ev.name in labels and _owner(ev, reduction) is None:
            # (a label inside a reduction label would count its time twice)
            ms[ev.name] += ev.cpu_time_total / 1e3
        if _is_top_aten(ev):
            where = _owner(ev, anywhere)
            key = {_STEP: "step other", "forward": "outside blocks"}.get(where, where)
            if key is not None:
                count[key] += 1
    inner = sum(ms[p] for p in (*_BLOCK, *_REDUCTION))
    ms["step other"] = max(ms[_STEP] - inner, 0.0)
    ms["outside blocks"] = max(ms["forward"] - ms[_STEP], 0.0)
    return [ProfileRow(p, ms[p] / runs, count[p] / runs) for p in PARTS]


@torch.inference_mode()
def profile_forward(model: nn.Module, x: torch.Tensor, runs: int = 5, warmup: int = 2
                    ) -> list[ProfileRow]:
    """Profile ``runs`` forward passes of ``model`` on ``x`` (after ``warmup`` unprofiled ones)
    and split each pass's CPU time and ATen operations into :data:`PARTS`.

    Times come from the profiler, which adds its own cost to every operation, so they are
    larger than ``imagepiece bench``'s; compare them with each other, not with the bench.
    """
    with _labels():
        for _ in range(warmup):
            model(x)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(runs):
                with record_function("forward"):
                    model(x)
    return _rows(prof.events(), runs)


class _WallClock:
    """Seconds spent inside each label during one forward pass. A label inside a reduction
    label is not counted again (its time is already in the outer one)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._in_reduction = 0

    def span(self, label: str) -> _Span:
        return _Span(self, label)


class _Span:
    __slots__ = ("clock", "label", "counted", "inside", "t0")

    def __init__(self, clock: _WallClock, label: str):
        self.clock, self.label = clock, label

    def __enter__(self) -> None:
        self.counted = self.clock._in_reduction == 0
        self.inside = self.label in _REDUCTION
        self.clock._in_reduction += self.inside
        self.t0 = time.perf_counter()

    def __exit__(self, *exc) -> None:
        elapsed = time.perf_counter() - self.t0
        if self.counted:
            self.clock.seconds[self.label] = self.clock.seconds.get(self.label, 0.0) + elapsed
        self.clock._in_reduction -= self.inside


def _pass_parts(seconds: dict[str, float], total: float) -> dict[str, float]:
    """Milliseconds of every part of one pass from its labels' seconds and its total."""
    ms = {p: seconds.get(p, 0.0) * 1e3 for p in (*_BLOCK, *_REDUCTION)}
    step = seconds.get(_STEP, 0.0) * 1e3
    ms["step other"] = max(step - sum(ms.values()), 0.0)
    ms["outside blocks"] = max(total * 1e3 - step, 0.0)
    return ms


@torch.inference_mode()
def wall_forward_parts(models: Mapping[str, nn.Module], x: torch.Tensor, runs: int = 20,
                       warmup: int = 2, seed: int = 0) -> dict[str, list[ProfileRow]]:
    """Wall-clock split of the forward passes of several models into :data:`PARTS`: one pass
    of each per round, in a new random order every round (a slow spell hits all alike), the
    first ``warmup`` rounds dropped; each part's median over ``runs`` passes.

    No profiler: the timers (a few per block, about a microsecond each) are the only cost
    added, so the reduction's share is what an unprofiled pass spends in it.
    """
    clock, rng = _WallClock(), random.Random(seed)
    passes: dict[str, list[dict[str, float]]] = {k: [] for k in models}
    with _labels(clock.span):
        for rnd in range(warmup + runs):
            order = list(models)
            rng.shuffle(order)
            for key in order:
                clock.seconds = {}
                t0 = time.perf_counter()
                models[key](x)
                total = time.perf_counter() - t0
                if rnd >= warmup:
                    passes[key].append(_pass_parts(clock.seconds, total))
    return {key: [ProfileRow(p, statistics.median(d[p] for d in rows), None) for p in PARTS]
            for key, rows in passes.items()}
