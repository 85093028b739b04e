"""Numbers of the study: seed statistics, accuracy-vs-compute curves and the matched-compute table.

Methods are compared at matched compute (docs/methods.md): each method's test top-1 is interpolated
piecewise-linearly on its own accuracy-vs-GMACs curve (its operating points; the seed mean where
there are several seeds) at the GMACs of the baseline divided by 1.5 and 2.5, and likewise on
the accuracy-vs-measured-speed-up curve. Nothing is extrapolated: a target outside a curve's
range is reported as missing.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from .registry import Row

KINDS = ("fine-tuned", "off-the-shelf")
METHODS = ("tome", "evit", "imagepiece")


def interpolate(points: Iterable[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` (any order; ``y`` values of
    equal ``x`` are averaged); None outside ``[min x, max x]`` or with no points."""
    merged: dict[float, list[float]] = {}
    for px, py in points:
        merged.setdefault(float(px), []).append(float(py))
    xs = sorted(merged)
    if not xs or not xs[0] <= x <= xs[-1]:
        return None
    ys = [statistics.fmean(merged[v]) for v in xs]
    for i in range(len(xs) - 1):
        if xs[i] <= x <= xs[i + 1]:
            return ys[i] + (ys[i + 1] - ys[i]) * (x - xs[i]) / (xs[i + 1] - xs[i])
    return ys[0]  # a single point, x equal to it


def seed_stats(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample std (0 for one value), min, max and count."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def row_table(rows: list[Row], evals: dict[str, dict[str, Any]], speed: dict[str, Any] | None
              ) -> list[dict[str, Any]]:
    """One flat record per evaluated row (missing evaluations are left out)."""
    variants = (speed or {}).get("variants", {})
    out = []
    for r in rows:
        ev = evals.get(r.name)
        if ev is None:
            continue
        sp = variants.get(r.name, {})
        out.append({"row": r.name, "kind": r.kind, "group": r.group, "point": r.point, "seed": r.seed,
                    "spec": r.spec, "run": r.run, "gmacs": ev["gmacs"], "val_top1": ev["val_top1"],
                    "test_top1": ev["test_top1"], "test_top5": ev["test_top5"],
                    "images_per_s": sp.get("images_per_s"), "speedup": sp.get("speedup"),
                    "command": ev.get("command")})
    return out


def group_stats(table: list[dict[str, Any]], kind: str, group: str, point: str) -> dict[str, Any] | None:
    """Seed statistics of test top-1 for one (kind, group, point), with GMACs and speed."""
    recs = [t for t in table if t["kind"] == kind and t["group"] == group and t["point"] == point]
    if not recs:
        return None
    speed = next((t["speedup"] for t in recs if t["speedup"] is not None), None)
    return {"kind": kind, "group": group, "point": point, "gmacs": recs[0]["gmacs"], "speedup": speed,
            "spec": recs[0]["spec"], "rows": [t["row"] for t in recs],
            **seed_stats([t["test_top1"] for t in recs]),
            "val_mean": statistics.fmean(t["val_top1"] for t in recs)}


def curves(table: list[dict[str, Any]], points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every (kind, method, point) that has results, in point order."""
    out = []
    for kind in KINDS:
        for p in points:
            s = group_stats(table, kind, p["method"], p["label"])
            if s is not None:
                out.append({**s, "target": p["target"]})
    return out


def _curve_xy(curve: list[dict[str, Any]], kind: str, method: str, x: str) -> list[tuple[float, float]]:
    return [(c[x], c["mean"]) for c in curve if c["kind"] == kind and c["group"] == method
            and c[x] is not None]


def matched(curve: list[dict[str, Any]], base_gmacs: float, reductions: Sequence[float]
            ) -> list[dict[str, Any]]:
    """Test top-1 of each method at ``base_gmacs / r`` GMACs and at ``r``x measured speed-up."""
    out = []
    for kind in KINDS:
        for m in METHODS:
            rec: dict[str, Any] = {"kind": kind, "method": m}
            for r in reductions:
                rec[f"top1_at_{r:g}x_gmacs"] = interpolate(_curve_xy(curve, kind, m, "gmacs"), base_gmacs / r)
                rec[f"top1_at_{r:g}x_speed"] = interpolate(_curve_xy(curve, kind, m, "speedup"), r)
            out.append(rec)
    return out


def bracket(curve: list[dict[str, Any]], kind: str, method: str, x: str, at: float
            ) -> list[tuple[float, list[str]]] | None:
    """The curve points around ``at`` as (interpolation weight, row names of one point), so that
    the value ``interpolate`` reads off the curve is ``sum(weight * seed mean of rows)``
    (points of equal ``x`` share their weight, as ``interpolate`` averages them); None outside."""
    merged: dict[float, list[list[str]]] = {}
    for c in curve:
        if c["kind"] == kind and c["group"] == method and c[x] is not None:
            merged.setdefault(float(c[x]), []).append(c["rows"])
    xs = sorted(merged)
    if not xs or not xs[0] <= at <= xs[-1]:
        return None
    pair = next(((lo, hi) for lo, hi in zip(xs, xs[1:], strict=False) if lo <= at <= hi), None)
    if pair is None:  # a single point, ``at`` equal to it
        return [(1.0 / len(merged[xs[0]]), rows) for rows in merged[xs[0]]]
    t = (at - pair[0]) / (pair[1] - pair[0])
    return [(w / len(merged[v]), rows) for w, v in ((1 - t, pair[0]), (t, pair[1])) if w > 0
            for rows in merged[v]]


def noise_near(curve: list[dict[str, Any]], kind: str, method: str, gmacs: float) -> float:
    """Seed std of the seeded point of ``method`` nearest in GMACs (the noise of a matched value)."""
    seeded = [c for c in curve if c["kind"] == kind and c["group"] == method and c["n"] > 1]
    if not seeded:
        return math.nan
    return min(seeded, key=lambda c: abs(math.log(c["gmacs"] / gmacs)))["std"]
