"""Everything the report shows, gathered from the cache: rows, curves, matched table, checks,
the tuning decision and the claims. Works on a partial study (missing parts are "pending")."""

from __future__ import annotations

import math
import statistics
from typing import Any

from .claims import compute_claims, paired_groups
from .config import StudyConfig
from .paired import MIN_POOLED_DOF, pooled_dof, pooled_std
from .registry import Row, retune_candidates, tuning_candidates
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


def decide_retune(cfg: StudyConfig, val: dict[str, float], first: dict[str, Any]) -> dict[str, Any]:
    """The second tuning round's decision, by the first round's rule: a candidate replaces the
    first round's knobs (``first``) only when its validation top-1 beats the mean of the
    reference's seeds by more than their range (at least ``cfg.tune_margin``). ``final`` is
    False until every row is done, and then the first round's knobs are assumed."""
    ref = [val[f"retune/reference/s{s}"] for s in cfg.seeds if f"retune/reference/s{s}" in val]
    rows = [{"candidate": "reference", "knobs": first, "seeds": len(ref), "values": ref,
             "val": ", ".join(f"{v:.2f}" for v in ref) or "pending", "complete": len(ref) == len(cfg.seeds)}]
    for name, knobs in retune_candidates(cfg).items():
        got = [val[k] for k in (f"retune/{name}/s{cfg.seeds[0]}",) if k in val]
        rows.append({"candidate": name, "knobs": {**first, **knobs}, "seeds": len(got), "values": got,
                     "val": ", ".join(f"{v:.2f}" for v in got) or "pending", "complete": bool(got)})
    if not all(r["complete"] for r in rows):
        return {"knobs": first, "final": False, "candidates": rows,
                "decision": "pending (the first round's knobs assumed until every run is done)"}
    mu, margin = statistics.fmean(ref), max(max(ref) - min(ref), cfg.tune_margin)
    better = [r for r in rows[1:] if r["values"][0] - mu > margin]
    if not better:
        return {"knobs": first, "final": True, "candidates": rows,
                "decision": f"the first round's knobs {first} kept: no candidate beat the reference's mean "
                            f"{mu:.2f} by more than {margin:.2f} (its seed range, at least "
                            f"{cfg.tune_margin})"}
    best = max(better, key=lambda r: r["values"][0])
    return {"knobs": best["knobs"], "final": True, "candidates": rows,
            "decision": f"{best['candidate']} ({best['knobs']}) used for every from-scratch ImagePiece arm: "
                        f"{best['values'][0]:.2f} vs the reference's mean {mu:.2f} "
                        f"(+{best['values'][0] - mu:.2f} > {margin:.2f})"}


def checks(cfg: StudyConfig, val: dict[str, float]) -> list[list[str]]:
    """[check, value, target, result] rows; result is "ok", "FAILED", "FAILED (accepted: why)" for a
    check the configuration accepts, or "pending"."""
    base = val.get("scratch/baseline")
    evit = val.get("fine-tuned/evit/k07/s0")
    out = [["baseline val top-1 (the gate before any fine-tune)", base, f">= {cfg.baseline_val_target}",
            None if base is None else base >= cfg.baseline_val_target]]
    gap = None if base is None or evit is None else base - evit
    out.append(["EViT keep 0.7 fine-tune: val points below the baseline", gap, f"<= {cfg.ft_gap_target}",
                None if gap is None else gap <= cfg.ft_gap_target])
    accepted = dict(cfg.accepted_checks)
    return [[c, "pending" if v is None else f"{v:.2f}", t,
             {None: "pending", True: "ok", False: "FAILED"}[r]
             + (f" (accepted: {accepted[c]})" if r is False and c in accepted else "")]
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


def pooled_seed_std(table: list[dict[str, Any]]) -> dict[str, float]:
    """Pooled seed std of test top-1 per protocol: fine-tuned points and controls; from scratch,
    its own once it rests on ``MIN_POOLED_DOF`` degrees of freedom, before that the pooled std
    over every seeded group of the study (from-scratch groups included)."""
    groups: dict[tuple, list[float]] = {}
    for t in table:
        groups.setdefault((t["kind"], t["group"], t["point"]), []).append(t["test_top1"])
    ft_groups = [v for k, v in groups.items() if k[0] in ("fine-tuned", "control")]
    scratch_groups = [v for k, v in groups.items() if k[0] == "from-scratch"]
    ft, scratch, dof = pooled_std(ft_groups), pooled_std(scratch_groups), pooled_dof(scratch_groups)
    used = scratch if dof >= MIN_POOLED_DOF else pooled_std(ft_groups + scratch_groups)
    return {"fine-tuned": ft, "from-scratch": used, "from-scratch-own": scratch, "from-scratch-dof": dof}


#: The from-scratch table's label of ImagePiece's stem control (first-round knobs).
STEM_CONTROL = "imagepiece (stem control: the first tuning round's knobs)"


def scratch_table(S: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per from-scratch arm: seeds, GMACs, images/s against the stem baseline, val and
    test top-1, and the paired test difference to EViT at its point and to the stem baseline."""
    t = S["table"]
    arms = sorted({(r["group"], r["point"]) for r in t if r["kind"] == "from-scratch"},
                  key=lambda a: (a[1] != "-", a[1] != "k07", a))
    base = group_stats(t, "from-scratch", "none", "-")
    records = [(group, group_stats(t, "from-scratch", group, point)) for group, point in arms]
    control = group_stats(t, "control", "imagepiece-stem", "k07")
    arm = group_stats(t, "from-scratch", "imagepiece", "k07")
    if control and (arm is None or arm["spec"] != control["spec"]):
        # ImagePiece's stem control (the same training, the first tuning round's knobs) is its
        # arm when the second round keeps those knobs; otherwise it is shown beside the arm (or
        # alone while the arm trains), labelled with what it is.
        records.append((STEM_CONTROL, control))
    out = []
    for group, g in records:
        point = g["point"]
        evit = group_stats(t, "from-scratch", "evit", point)
        # only the from-scratch arms are timed in the stem baseline's run (speed:scratch); a ratio
        # chained through another run's plain baseline would mix two runs' conditions
        timed = base and base["speedup"] and g["speedup"] and g["kind"] == "from-scratch"
        rec = {"arm": group, "point": point, "spec": g["spec"], "seeds": g["n"], "mmacs": 1000 * g["gmacs"],
               "speed_vs_stem_baseline": g["speedup"] / base["speedup"] if timed else None,
               "val_top1": g["val_mean"], "test_top1": g["mean"],
               "test_std": g["std"] if g["n"] > 1 else None}
        for name, other in (("evit", evit), ("stem_baseline", base)):
            p = None if other is None or other["rows"] == g["rows"] else paired_groups(S, g, other)
            rec.update({f"vs_{name}_{k}": (p or {}).get(k) for k in ("diff", "lo", "hi")})
        out.append(rec)
    return out


def summarize(cfg: StudyConfig, points: list[dict[str, Any]], rows: list[Row], evals: dict[str, dict],
              speed: dict[str, Any] | None, analyses: dict[str, Any], tuning: dict[str, Any],
              minutes: float, vectors: dict[str, Any] | None = None) -> dict[str, Any]:
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
        "vectors": vectors or {}, "pooled": pooled_seed_std(table),
    }
    S["scratch"] = scratch_table(S)
    S["claims"] = compute_claims(S)
    return S
