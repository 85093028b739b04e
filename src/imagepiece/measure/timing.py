"""Timing (docs/methods.md): interleaved rounds, CUDA peak memory, the steady allocator and the
machine record."""

from __future__ import annotations

import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["machine_info", "paired_ratio_interval", "peak_memory", "quantiles", "steady_allocator",
           "time_interleaved"]


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_allocator() -> str:
    """Make glibc keep freed memory in the process for the rest of its life.

    By default glibc serves blocks above its (adaptive, at most 32 MiB) mmap threshold with
    fresh ``mmap`` calls and returns them on free, so each such activation buffer is zero-filled
    again by the kernel (page faults) on its next use. How often that happens depends on what
    ran just before, which biased interleaved timings by up to 10% on DeiT-S batch 32 (the
    unmodified model vs the identical limit run). With mmap off and trimming off the heap grows
    to the peak working set once and is reused. Returns what was done ("steady (glibc)", or
    "default" where the C library is not glibc). Process-wide and not undone.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default"
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    return "steady (glibc)" if ok else "default"


def machine_info(devices: Sequence[str] = ()) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import timm

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_threads": torch.get_num_threads()}
    if any(d.startswith("cuda") for d in devices):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def quantiles(values: list[float]) -> tuple[float, float]:
    """First and third quartiles of ``values`` (both the value itself for a single one)."""
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def paired_ratio_interval(num: Sequence[float], den: Sequence[float], calls: int = 1,
                          level: float = 0.95, resamples: int = 2000, seed: int = 0
                          ) -> tuple[float, float] | None:
    """Bootstrap interval of ``median(num) / median(den)`` over rounds, the pairs kept together.

    ``num`` and ``den`` hold ``calls`` values per round in round order (as
    :func:`time_interleaved` returns them). Each resample draws whole rounds with replacement and
    takes the same rounds from both, so a slow spell that hit both sides of a round cancels in
    the ratio instead of widening the interval. ``None`` below 3 rounds or for unequal lengths.
    """
    rounds = len(num) // calls if calls > 0 else 0
    if rounds < 3 or len(num) != len(den) or len(num) != rounds * calls:
        return None
    n = torch.tensor(list(num), dtype=torch.float64).view(rounds, calls)
    d = torch.tensor(list(den), dtype=torch.float64).view(rounds, calls)
    pick = torch.randint(rounds, (resamples, rounds), generator=torch.Generator().manual_seed(seed))
    # torch.quantile at 0.5 interpolates the middle two, as statistics.median does
    ratio = (torch.quantile(n[pick].view(resamples, -1), 0.5, dim=1)
             / torch.quantile(d[pick].view(resamples, -1), 0.5, dim=1))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(ratio, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return lo, hi


def peak_memory(fn: Callable, x: torch.Tensor, device: str, ctx: Callable) -> float | None:
    """CUDA memory above what was allocated before one call of ``fn`` in ``ctx()``."""
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with ctx():
        fn(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_interleaved(fns: Mapping[Any, Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int,
                     runs: int, rng: random.Random | None = None,
                     step: Callable[[Any], None] | None = None, *, inference: bool = True,
                     repeat: int = 1, between: Callable[[], None] | None = None,
                     ) -> dict[Any, list[float]]:
    """Seconds of each ``fn(x)``, round by round in a new random order each round, so a slow
    spell of a shared machine hits every variant alike; the first ``warmup`` rounds are dropped.

    Runs under ``torch.inference_mode`` (``inference=False``: with gradients, for training
    steps); CUDA is synchronised around each call. ``repeat``: calls per variant per round, each
    timed alone (latency percentiles). ``between()`` runs after every round, untimed.
    """
    rng = rng or random.Random(0)
    sync = x.device.type == "cuda"
    times: dict[Any, list[float]] = {k: [] for k in fns}
    with torch.inference_mode() if inference else torch.enable_grad():
        for rnd in range(warmup + runs):
            order = list(fns)
            rng.shuffle(order)  # no variant always follows the same one
            for key in order:
                for _ in range(repeat):
                    t = _timed_call(fns[key], x, sync)
                    if rnd >= warmup:
                        times[key].append(t)
                if step is not None:
                    step(key)
            if between is not None:
                between()
    return times


def _timed_call(fn: Callable, x: torch.Tensor, sync: bool) -> float:
    if sync:
        torch.cuda.synchronize(x.device)
    t0 = time.perf_counter()
    fn(x)
    if sync:
        torch.cuda.synchronize(x.device)
    return time.perf_counter() - t0
