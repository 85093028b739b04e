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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.autograd.profiler import record_function

from .. import ops, runtime

__all__ = ["PARTS", "ProfileRow", "profile_forward"]

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


@dataclass
class ProfileRow:
    """One part of a forward pass: milliseconds per pass and ATen operations launched per pass."""

    part: str
    ms: float
    ops: float

    @property
    def is_reduction(self) -> bool:
        return self.part not in (*_BLOCK, "outside blocks")


class _LabelledLayout:
    """A family's layout whose block compute runs under profiler labels."""

    def __init__(self, layout: runtime.Layout):
        self._layout = layout

    def attend(self, blk, x, bias):
        with record_function("attention"):
            return self._layout.attend(blk, x, bias)

    def mlp(self, blk, x):
        with record_function("mlp"):
            return self._layout.mlp(blk, x)

    def whole(self, blk, x):
        with record_function("block"):
            return self._layout.whole(blk, x)

    def scale(self, blk):
        return self._layout.scale(blk)


def _labelled(label: str, fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(label):
            return fn(*args, **kwargs)
    return wrapper


@contextlib.contextmanager
def _labels() -> Iterator[None]:
    """Wrap the step and the reduction ops in profiler labels; restore them on exit."""
    saved = [(runtime, "_block_step", runtime._block_step)]
    step = runtime._block_step

    def labelled_step(layout, *args, **kwargs):
        with record_function(_STEP):
            return step(_LabelledLayout(layout), *args, **kwargs)

    runtime._block_step = labelled_step
    for label, places in _REDUCTION.items():
        for module, name in places:
            fn = getattr(module, name)
            saved.append((module, name, fn))
            setattr(module, name, _labelled(label, fn))
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
