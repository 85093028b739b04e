"""Noticing a busy machine during ``imagepiece bench``.

Interleaving makes a slow spell hit every variant alike, but a machine busy for the *whole* run
slows the variants unequally (a model that needs every core loses more than one that waits on
memory), and the spread of the timings stays tight, so nothing in the timings themselves shows
it. Two readings do:

- **other processes' CPU time** on the CPUs this process may run on: the busy time that
  ``/proc/stat`` counts on those CPUs minus this process's own CPU time, per second of the run
  (in cores). When it exceeds the cores the benchmark leaves free (CPUs minus threads), other
  processes competed with it;
- **a calibration kernel** (a fixed small matrix product) timed before the first round and
  after every round: when its slowest timing is much slower than its fastest, the machine got
  busier (or slower) during the run.

:func:`judge` turns the readings into the reasons for a warning; :class:`BusyMonitor` takes them.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["BusyMonitor", "BusyReport", "CALIBRATION_SLOWDOWN", "MIN_WINDOW_S", "OTHERS_TOLERANCE",
           "judge", "others_cores", "parse_proc_stat"]

#: Cores of other processes' CPU use tolerated beyond the cores the benchmark leaves free.
OTHERS_TOLERANCE = 0.25
#: Slowest / fastest calibration timing above this means the machine changed during the run.
CALIBRATION_SLOWDOWN = 1.5
#: /proc/stat counts in ticks (10 ms): a shorter window cannot tell other processes' use.
MIN_WINDOW_S = 1.0

_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)  # user nice system irq softirq steal (guest is in user)


def parse_proc_stat(text: str, cpus: Iterable[int]) -> float:
    """Busy ticks (user, nice, system, irq, softirq, steal) summed over the given CPUs' lines
    of ``/proc/stat``."""
    wanted = {f"cpu{c}" for c in cpus}
    total = 0
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] in wanted:
            values = [int(v) for v in parts[1:]]
            total += sum(values[i] for i in _BUSY_FIELDS if i < len(values))
    return float(total)


def _our_cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


@dataclass
class CpuReading:
    """Cumulative counters at one instant (seconds)."""

    wall: float
    busy: float | None  # busy CPU time of all processes on our CPUs; None: no /proc/stat
    own: float  # this process's CPU time, all threads


def read_cpu(cpus: Sequence[int]) -> CpuReading:
    stat = _read("/proc/stat")
    busy = None
    if stat is not None:
        busy = parse_proc_stat(stat, cpus) / os.sysconf("SC_CLK_TCK")
    return CpuReading(time.perf_counter(), busy, time.process_time())


def others_cores(start: CpuReading, end: CpuReading) -> float | None:
    """Average cores of CPU time used by other processes between two readings; None without
    ``/proc/stat`` or for a window shorter than :data:`MIN_WINDOW_S` (ticks are too coarse)."""
    wall = end.wall - start.wall
    if start.busy is None or end.busy is None or wall < MIN_WINDOW_S:
        return None
    return max(0.0, ((end.busy - start.busy) - (end.own - start.own)) / wall)


def calibrate(size: int = 192, reps: int = 24, samples: int = 3) -> float:
    """Seconds of a fixed small workload (``reps`` products of two ``size``² fp32 matrices on
    torch's current threads), the median of ``samples`` timings."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen)
    b = torch.randn(size, size, generator=gen)
    times = []
    with torch.inference_mode():
        for _ in range(samples):
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def judge(cpus: int, threads: int, others: float | None, calibration: Sequence[float]) -> list[str]:
    """The reasons to call a run disturbed (empty: none seen).

    ``cpus``: CPUs this process may use; ``threads``: threads the benchmark ran; ``others``:
    average cores other processes used on those CPUs; ``calibration``: seconds of the
    calibration kernel, before the first round and after each round. Busy when the others
    used more than the free cores plus :data:`OTHERS_TOLERANCE`, or when the calibration's
    upper quartile is :data:`CALIBRATION_SLOWDOWN` times its best.
    """
    reasons = []
    free = max(0, cpus - threads)
    if others is not None and others > free + OTHERS_TOLERANCE:
        reasons.append(f"other processes used {others:.2f} of this process's {cpus} CPUs on "
                       f"average while the benchmark ran {threads} thread(s) ({free} left free)")
    if len(calibration) >= 2 and min(calibration) > 0:
        # the upper quartile: a quarter of the rounds or more were slow, not one hiccup
        upper = statistics.quantiles(calibration, n=4, method="inclusive")[2]
        slow = upper / min(calibration)
        if slow > CALIBRATION_SLOWDOWN:
            reasons.append(f"a calibration kernel timed between rounds was {slow:.1f}x slower in "
                           f"a quarter of the rounds ({upper * 1e3:.2f} ms) than at best "
                           f"({min(calibration) * 1e3:.2f} ms): the load changed during the run")
    return reasons


@dataclass
class BusyReport:
    cpus: int
    threads: int
    others_cores: float | None
    seconds: float
    calibration_ms: list[float]
    loadavg_before: str | None
    loadavg_after: str | None
    reasons: list[str] = field(default_factory=list)

    @property
    def busy(self) -> bool:
        return bool(self.reasons)

    def as_dict(self) -> dict[str, Any]:
        return {"busy": self.busy, "reasons": list(self.reasons), "cpus": self.cpus,
                "threads": self.threads, "others_cores": self.others_cores, "seconds": self.seconds,
                "calibration_ms": list(self.calibration_ms),
                "loadavg_before": self.loadavg_before, "loadavg_after": self.loadavg_after}


class BusyMonitor:
    """``start()`` before the first round, ``round()`` after each, ``stop()`` at the end (which
    keeps timing the calibration kernel until the window is :data:`MIN_WINDOW_S` long)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.cpus = _our_cpus()
        self._calib: list[float] = []
        self._start: CpuReading | None = None
        self._load: str | None = None

    def start(self) -> None:
        self._load = (_read("/proc/loadavg") or "").strip() or None
        self._calib.append(calibrate())
        self._start = read_cpu(self.cpus)

    def round(self) -> None:
        self._calib.append(calibrate())

    def stop(self) -> BusyReport:
        # a run shorter than the ticks can resolve is extended with calibration kernels
        while self._start is not None and time.perf_counter() - self._start.wall < MIN_WINDOW_S:
            self._calib.append(calibrate())
        end = read_cpu(self.cpus)
        others = others_cores(self._start, end) if self._start is not None else None
        seconds = end.wall - self._start.wall if self._start is not None else 0.0
        report = BusyReport(len(self.cpus), self.threads, others, seconds,
                            [t * 1e3 for t in self._calib], self._load,
                            (_read("/proc/loadavg") or "").strip() or None)
        report.reasons = judge(report.cpus, self.threads, others, self._calib)
        return report
