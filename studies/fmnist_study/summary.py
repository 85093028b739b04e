"""Everything the report shows, gathered from the cache: rows, curves, matched table, checks,
the tuning decision and the claims. Works on a partial study (missing parts are "pending")."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .claims import compute_claims
from .config import StudyConfig
from .registry import Row, tuning_candidates
from .report import curves, group_stats, matched, row_table

CONTROL_GROUPS = ("baseline-finetuned", "evit+coherence", "imagepiece-nocoherence", "imagepiece+tome",
                  "imagepiece-stem")


def decide_tuning(cfg: StudyConfig, val: dict[str, float]) -> dict[str, Any]:
    """The ImagePiece knobs the study uses, from the tuning rows' validation top-1 (``val``: row
    name -> val top-1). A candidate replaces the package default only when it beats the mean of
    the default's seeds by more than their range (and at least ``cfg.tune_margin``); the best
    such candidate wins. Until every tuning row is done the defaults are assumed."""
    cands = tuning_candidates(cfg)
    rows = []
    for name, knobs in cands.items():
        seeds = cfg.seeds if name == "default" else cfg.seeds[:1]
        got = [val[f"tune/{name}/s{s}"] for s in seeds if f"tune/{name}/s{s}" in val]
        rows.append({"candidate": name, "knobs": knobs, "seeds": len(got),
                     "val": ", ".join(f"{v:.2f}" for v in got) or "pending", "values": got,
                     "complete": len(got) == len(seeds)})
    if not all(r["complete"] for r in rows):
        return {"knobs": {}, "final": False, "candidates": rows,
                "decision": "pending (package defaults assumed until every tuning run is done)"}
    default = rows[0]["values"]
    mu, margin = statistics.fmean(default), max(max(default) - min(default), cfg.tune_margin)
    better = [r for r in rows[1:] if r["values"][0] - mu > margin]
    if not better:
        return {"knobs": {}, "final": True, "candidates": rows,
                "decision": f"package defaults kept: no candidate beat the default's mean {mu:.2f} by more "
                            f"than {margin:.2f} (its seed range, at least {cfg.tune_margin})"}
    best = max(better, key=lambda r: r["values"][0])
    return {"knobs": best["knobs"], "final": True, "candidates": rows,
            "decision": f"{best['candidate']} ({best['knobs']}) used: {best['values'][0]:.2f} vs the "
                        f"default's mean {mu:.2f} (+{best['values'][0] - mu:.2f} > {margin:.2f}) for every "
                        "ImagePiece row of this study; the package default is a separate decision "
                        "(docs/study.md)"}


def checks(cfg: StudyConfig, val: dict[str, float]) -> list[list[str]]:
    """[check, value, target, result] rows; result is "ok", "FAILED" or "pending"."""
    base = val.get("scratch/baseline")
    evit = val.get("fine-tuned/evit/k07/s0")
    out = [["baseline val top-1 (the gate before any fine-tune)", base, f">= {cfg.baseline_val_target}",
            None if base is None else base >= cfg.baseline_val_target]]
    gap = None if base is None or evit is None else base - evit
    out.append(["EViT keep 0.7 fine-tune: val points below the baseline", gap, f"<= {cfg.ft_gap_target}",
                None if gap is None else gap <= cfg.ft_gap_target])
    return [[c, "pending" if v is None else f"{v:.2f}", t, {None: "pending", True: "ok", False: "FAILED"}[r]]
            for c, v, t, r in out]


def speed_noise(speed: dict[str, Any] | None) -> float:
    """Largest relative speed difference between timed rows of identical architecture and plan."""
    v = (speed or {}).get("variants", {})
    pairs = [("scratch/baseline", "control/baseline-finetuned")]
    pairs += [(k, k.replace("off-the-shelf", "fine-tuned") + "/s0") for k in v
              if k.startswith(("off-the-shelf/tome/", "off-the-shelf/evit/"))]
    diffs = [abs(v[a]["images_per_s"] / v[b]["images_per_s"] - 1) for a, b in pairs if a in v and b in v]
    return max(diffs) if diffs else math.nan


def _speed_note(speed: dict[str, Any] | None, noise: float) -> str:
    if not speed:
        return "pending"
    m, busy = speed["machine"], speed["busy"]
    flag = "busy machine: " + "; ".join(busy.get("reasons", [])) if busy.get("busy") else "machine not busy"
    return (f"{m.get('cpu')}, {speed['threads']} threads, torch {m.get('torch')}, timm {m.get('timm')}; "
            f"batch {speed['batch']}, {speed['rounds']} interleaved rounds after {speed['warmup']} warm-up, "
            f"allocator {speed['allocator']}; {flag}. Noise floor (identical architecture and plan): "
            f"{100 * noise:.1f}%.")


def summarize(cfg: StudyConfig, points: list[dict[str, Any]], rows: list[Row], evals: dict[str, dict],
              speed: dict[str, Any] | None, analyses: dict[str, Any], tuning: dict[str, Any],
              minutes: float) -> dict[str, Any]:
    table = row_table(rows, evals, speed)
    curve = curves(table, points)
    base = group_stats(table, "scratch", "baseline", "-")
    controls = [c for g in CONTROL_GROUPS for p in ("-", "k07") if (c := group_stats(table, "control", g, p))]
    val = {t["row"]: t["val_top1"] for t in table}
    noise = speed_noise(speed)
    S: dict[str, Any] = {
        "config": cfg.name, "points": points, "table": table, "curve": curve, "base": base,
        "controls": controls, "base_gmacs": base["gmacs"] if base else math.nan,
        "matched_at": list(cfg.matched),
        "matched": matched(curve, base["gmacs"], cfg.matched) if base else [], "seeds": len(cfg.seeds),
        "speed": speed, "speed_noise": noise, "speed_note": _speed_note(speed, noise), "analyses": analyses,
        "tuning": tuning, "checks": checks(cfg, val),
        "test_images": max((e.get("test_images", 0) for e in evals.values()), default=0),
        "setup": f"{len(table)} of {len(rows)} rows evaluated; training so far {minutes:.0f} min.",
    }
    S["claims"] = compute_claims(S)
    return S
