"""The paper's claims, one by one, with a verdict from this study's numbers.

Accuracy differences on the test split are paired (``paired.py``): a 95% interval from a
paired bootstrap over the 10,000 test images combined with the seed spread (a single-seed point
borrows the pooled seed std of its protocol); *agrees* when the interval is above zero (and, for
a claimed size ``c``, reaches ``c``), *agrees in direction, smaller* when it is above zero but
below ``c``, *within noise* when it contains zero, *disagrees* when it is below zero. Values
read off a curve carry their interpolation weights. Masking accuracies (other images, masked)
use the binomial standard error of the images used (``verdict`` with ``se``); speed ratios use
the run's noise floor (the largest difference between two
timed rows of identical architecture and plan); shares and similarities (one seed, no spread)
use fixed bands: 0.01 for attentiveness shares, 0.02 for similarities, 0.05 for Table 7 shares.
A claim whose rows are not finished yet is *pending*; one this set-up cannot test says so.
"""

from __future__ import annotations

import math
from typing import Any

from . import paired as P
from .report import bracket, group_stats, interpolate

FT, CTRL, SCRATCH, OTS = "fine-tuned", "control", "from-scratch", "off-the-shelf"


def verdict(diff: float | None, se: float, claimed: float = 0.0) -> str:
    if diff is None or math.isnan(diff):
        return "pending"
    band = 2 * (0.0 if math.isnan(se) else se)
    if diff < -band:
        return "disagrees"
    if abs(diff) <= band:
        return "within noise"
    if claimed > 0 and diff < claimed - band:
        return "agrees in direction, smaller"
    return "agrees"


def fmt(s: dict[str, Any] | None) -> str:
    if s is None:
        return "pending"
    return f"{s['mean']:.2f} ± {s['std']:.2f} (n={s['n']})" if s["n"] > 1 else f"{s['mean']:.2f} (n=1)"


def binomial_se_diff(a: float, b: float, n: int) -> float:
    """Standard error of the difference of two accuracies (fractions) each measured on ``n``
    images: the only noise when the weights are fixed."""
    return math.sqrt(a * (1 - a) / n + b * (1 - b) / n)


def claim(cid: str, paper: str, here: str, v: str) -> dict[str, str]:
    return {"claim": cid, "paper": paper, "here": here, "verdict": v}


def term(S: dict[str, Any], rows: list[str], kind: str, weight: float = 1.0) -> P.Term | None:
    """``weight`` times the seed mean of ``rows``, or None while a row has no test vector."""
    vecs = S.get("vectors", {})
    if not rows or any(r not in vecs for r in rows):
        return None
    return P.Term(weight, tuple(vecs[r] for r in rows), seeded=kind != OTS)


def pooled(S: dict[str, Any], kind: str) -> float:
    return S.get("pooled", {}).get(SCRATCH if kind == SCRATCH else FT, float("nan"))


def paired_groups(S: dict[str, Any], a: dict | None, b: dict | None) -> dict[str, float] | None:
    """The paired difference of two group_stats records (None while either is incomplete)."""
    if a is None or b is None:
        return None
    ta, tb = term(S, a["rows"], a["kind"]), term(S, b["rows"], b["kind"])
    if ta is None or tb is None:
        return None
    return P.paired([ta], [tb], pooled(S, a["kind"] if a["kind"] == SCRATCH else b["kind"]))


def compare(S: dict[str, Any], cid: str, paper: str, a: dict | None, b: dict | None, names: tuple[str, str],
            claimed: float = 0.0) -> dict[str, str]:
    p = paired_groups(S, a, b)
    here = f"{names[0]} {fmt(a)} vs {names[1]} {fmt(b)}"
    if p is None:
        return claim(cid, paper, here, "pending")
    return claim(cid, paper, f"{here}: {P.describe(p)} (95% paired interval)", P.verdict(p, claimed))


def accuracy_claims(S: dict[str, Any]) -> list[dict[str, str]]:
    t = S["table"]
    ip, ev = group_stats(t, FT, "imagepiece", "k07"), group_stats(t, FT, "evit", "k07")
    tome = group_stats(t, FT, "tome", "k07")
    return [
        compare(S, "Table 1: ImagePiece >= EViT at keep 0.7", "80.22 vs 79.37", ip, ev,
                ("ImagePiece", "EViT")),
        compare(S, "Table 1: ImagePiece at keep 0.7 >= the unreduced model", "80.22 vs 79.83", ip,
                group_stats(t, CTRL, "baseline-finetuned", "-"), ("ImagePiece", "baseline + fine-tune")),
        compare(S, "Table 2/9: ImagePiece+ToMe >= ToMe (r matched to keep 0.7)", "80.08 vs 79.36",
                group_stats(t, CTRL, "imagepiece+tome", "k07"), tome, ("ImagePiece+ToMe", "ToMe")),
        compare(S, "Table 8: local coherence adds accuracy", "80.22 vs 79.81 (+0.41)", ip,
                group_stats(t, CTRL, "imagepiece-nocoherence", "k07"), ("with", "without")),
        compare(S, "Control: EViT with ImagePiece's coherence branch (no paper claim)", "-",
                group_stats(t, CTRL, "evit+coherence", "k07"), ev, ("EViT+coherence", "EViT")),
        compare(S, "Paper's setting: coherence stem from scratch vs residual branch fine-tuned (no claim)",
                "-",
                group_stats(t, CTRL, "imagepiece-stem", "k07"), ip, ("stem", "residual")),
    ]


def scratch_claims(S: dict[str, Any]) -> list[dict[str, str]]:
    """The paper's protocol: every arm trained from scratch with the coherence stem (docs/methods.md)."""
    t = S["table"]

    def arm(group: str, point: str) -> dict | None:
        return group_stats(t, SCRATCH, group, point)

    ip, ev, base = arm("imagepiece", "k07"), arm("evit", "k07"), arm("none", "-")
    return [
        compare(S, "From scratch, Table 1: ImagePiece >= EViT at keep 0.7 (stem on both)", "80.22 vs 79.37",
                ip, ev, ("ImagePiece", "EViT")),
        compare(S, "From scratch, Table 1: ImagePiece at keep 0.7 >= the unreduced model (stem on both)",
                "80.22 vs 79.83", ip, base, ("ImagePiece", "stem baseline")),
        compare(S, "From scratch, Table 1: ImagePiece >= ToMe at EViT keep 0.7's GMACs", "80.22 vs 79.36",
                ip, arm("tome", "k07"), ("ImagePiece", "ToMe")),
        compare(S, "From scratch, Figure 3: ImagePiece vs EViT at 2.5x fewer GMACs (stem on both)",
                "74.5 vs 66.5 at 2.44x images/s (> 8 points)", arm("imagepiece", "hyper"),
                arm("evit", "hyper"),
                ("ImagePiece", "EViT"), claimed=8.0),
        compare(S, "From scratch: ImagePiece vs ToMe at 2.5x fewer GMACs (no paper claim; stem on both)",
                "-", arm("imagepiece", "hyper"), arm("tome", "hyper"), ("ImagePiece", "ToMe")),
        compare(S, "From scratch, Table 8: the coherence stem adds accuracy under ImagePiece",
                "80.22 vs 79.81",
                ip, arm("imagepiece-nostem", "k07"), ("stem", "no stem")),
        compare(S, "From scratch: the coherence stem without reduction (no paper claim; 37 vs 35 epochs)",
                "-",
                base, group_stats(t, "scratch", "baseline", "-"), ("stem baseline", "plain baseline")),
    ]


def _matched_claim(S: dict[str, Any], r: float, axis: str, claimed: float, paper: str,
                   kind: str = FT) -> dict[str, str]:
    what = (f"Figure 3: ImagePiece vs EViT at {r:g}x {'fewer GMACs' if axis == 'gmacs' else 'images/s'}"
            + ("" if kind == FT else f" ({kind}, no training)"))
    x, at = ("gmacs", S["base_gmacs"] / r) if axis == "gmacs" else ("speedup", r)
    terms = []
    for method in ("imagepiece", "evit"):
        br = bracket(S["curve"], kind, method, x, at)
        got = [term(S, rows, kind, w) for w, rows in br] if br else [None]
        terms.append(None if None in got else got)
    if None in terms:
        return claim(what, paper, "pending or outside a curve's range", "pending")
    p = P.paired(terms[0], terms[1], pooled(S, kind))
    a, b = (sum(t.value() for t in ts) for ts in terms)
    return claim(what, paper, f"{a:.2f} vs {b:.2f}: {P.describe(p)} (95% paired interval, interpolation "
                 "weights and seed spread included)", P.verdict(p, claimed))


def compute_claims(S: dict[str, Any]) -> list[dict[str, str]]:
    return [
        *accuracy_claims(S),
        *scratch_claims(S),
        speed_claim(S),
        _matched_claim(S, 1.5, "gmacs", 0.0, "80.0 vs 78.7 at 1.73x images/s"),
        _matched_claim(S, 2.5, "gmacs", 8.0, "74.5 vs 66.5 at 2.44x images/s (> 8 points)"),
        _matched_claim(S, 2.5, "speed", 8.0, "74.5 vs 66.5 at 2.44x images/s (> 8 points)"),
        _matched_claim(S, 2.5, "gmacs", 8.0, "74.5 vs 66.5 at 2.44x images/s (> 8 points; fine-tuned)",
                       kind="off-the-shelf"),
        same_accuracy_claim(S),
        masking_claim(S),
        attentiveness_claim(S),
        similarity_claim(S),
        coherence_similarity_claim(S),
        important_claim(S),
        claim("ImageNet-1k, DeiT-S/Ti, DynamicViT rows, RTX 3090 throughput", "Tables 1-3",
              "other data, models and hardware", "not testable here"),
    ]


def speed_claim(S: dict[str, Any]) -> dict[str, str]:
    v = (S.get("speed") or {}).get("variants", {})
    a, b = v.get("fine-tuned/imagepiece/k07/s0"), v.get("fine-tuned/evit/k07/s0")
    what, paper = "Table 1: ImagePiece faster than EViT at keep 0.7", "3891.9 vs 3787.5 img/s (+2.8%)"
    if a is None or b is None:
        return claim(what, paper, "pending", "pending")
    d, floor = a["speedup"] / b["speedup"] - 1, S["speed_noise"]
    here = (f"{a['speedup']:.2f}x vs {b['speedup']:.2f}x the baseline: {100 * d:+.1f}% "
            f"(noise floor {100 * floor:.1f}%)")
    return claim(what, paper, here, verdict(d, floor / 2))


def same_accuracy_claim(S: dict[str, Any]) -> dict[str, str]:
    """Speed of ImagePiece's fine-tuned curve at EViT keep 0.7's accuracy (paper: +28.5%)."""
    what, paper = "Same accuracy as EViT keep 0.7, ImagePiece much faster", "4868.0 vs 3787.5 img/s (+28.5%)"
    curve = [c for c in S["curve"] if c["kind"] == FT and c["group"] == "imagepiece" and c["speedup"]]
    ev = group_stats(S["table"], FT, "evit", "k07")
    if ev is None or ev["speedup"] is None or len(curve) < 2:
        return claim(what, paper, "pending", "pending")
    at = interpolate([(c["mean"], c["speedup"]) for c in curve], ev["mean"])
    if at is None:
        return claim(what, paper, f"EViT's {ev['mean']:.2f} is outside ImagePiece's accuracy range",
                     "pending")
    d = at / ev["speedup"] - 1
    return claim(what, paper, f"{at:.2f}x vs {ev['speedup']:.2f}x: {100 * d:+.1f}%",
                 verdict(d, S["speed_noise"] / 2, 0.285))


def _analysis(S: dict[str, Any], name: str) -> dict[str, Any] | None:
    return (S.get("analyses") or {}).get(name)


def masking_claim(S: dict[str, Any]) -> dict[str, str]:
    what, paper = "Table 4: most robust with many random masks", "50 masks: 71.42 vs 68.28 / 68.10 / 65.41"
    res = _analysis(S, "masking")
    if res is None:
        return claim(what, paper, "pending", "pending")
    most = max(r["masks"] for r in res["rows"])
    acc = {r["method"]: r["top1"] for r in res["rows"] if r["masks"] == most}
    n = next(iter(res["meta"].values()))["images"]
    ip = acc.get("fine-tuned/imagepiece/k07/s0")
    others = {k: acc[k] for k in ("scratch/baseline", "fine-tuned/evit/k07/s0", "fine-tuned/tome/k07/s0")
              if k in acc}
    if ip is None or not others:
        return claim(what, paper, "pending", "pending")
    rival = max(others, key=others.get)
    se = 100 * binomial_se_diff(ip / 100, others[rival] / 100, n)  # analyses give top-1 in percent
    here = (f"{most} masks: ImagePiece {ip:.1f} vs " + ", ".join(f"{k.split('/')[1]} {v:.1f}"
            for k, v in others.items()) + f" (n={n})")
    return claim(what, paper, here, verdict(ip - others[rival], se))


def attentiveness_claim(S: dict[str, Any]) -> dict[str, str]:
    what = "Table 5: non-semantic tokens become attentive again after re-tokenization"
    paper = "higher share of inattentive -> attentive tokens than pruning alone"
    res = _analysis(S, "attentiveness")
    if res is None:
        return claim(what, paper, "pending", "pending")
    pairs = {r["pair"] for r in res["rows"]
             if r["method"] == "fine-tuned/imagepiece/k07/s0" and r["kind"] == "retokenize"}
    ip, ev = "fine-tuned/imagepiece/k07/s0", "fine-tuned/evit/k07/s0"
    share = {m: _mean([r["inattentive_to_attentive"] for r in res["rows"] if r["method"] == m
                       and r["pair"] in pairs]) for m in (ip, ev)}
    a, b = share[ip], share[ev]
    here = f"re-tokenization -> prune pairs {sorted(pairs)}: ImagePiece {a:.3f} vs EViT {b:.3f}"
    return claim(what, paper, here, verdict(a - b, 0.005))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _first_last(S: dict[str, Any], label: str) -> tuple[float, float] | None:
    res = _analysis(S, "similarity")
    meta = (res or {}).get("meta", {}).get(label)
    if not meta:
        return None
    fl = next(iter(meta["first_last"].values()))
    return fl["first"], fl["last"]


def similarity_claim(S: dict[str, Any]) -> dict[str, str]:
    what = "Table 6: merged pairs stay similar across depth (ImagePiece), not with ToMe"
    paper = "ToMe 0.7852 -> 0.6763, ImagePiece 0.8091 -> 0.8096"
    tome, ip = _first_last(S, "fine-tuned/tome/k07/s0"), _first_last(S, "fine-tuned/imagepiece/k07/s0")
    if tome is None or ip is None:
        return claim(what, paper, "pending", "pending")
    here = f"ToMe {tome[0]:.3f} -> {tome[1]:.3f}, ImagePiece {ip[0]:.3f} -> {ip[1]:.3f}"
    drop_gap = (tome[0] - tome[1]) - (ip[0] - ip[1])
    return claim(what, paper, here, verdict(drop_gap, 0.01))


def coherence_similarity_claim(S: dict[str, Any]) -> dict[str, str]:
    what, paper = "Table 8 / §5: coherence raises first-block merged-pair similarity", "0.5293 -> 0.8091"
    coh = _first_last(S, "fine-tuned/imagepiece/k07/s0")
    plain = _first_last(S, "control/imagepiece-nocoherence/k07")
    if coh is None or plain is None:
        return claim(what, paper, "pending", "pending")
    here = f"without {plain[0]:.3f} -> with {coh[0]:.3f}"
    return claim(what, paper, here, verdict(coh[0] - plain[0], 0.01))


def important_claim(S: dict[str, Any], top: float = 0.3) -> dict[str, str]:
    what = f"Table 7: ToMe merges important tokens (top {top:.0%} by class attention), ImagePiece does not"
    paper = "ToMe merges important tokens too often"
    res = _analysis(S, "important")
    if res is None:
        return claim(what, paper, "pending", "pending")
    share = {r["method"]: r["share_merged_in_top"] for r in res["rows"] if abs(r["top"] - top) < 1e-9}
    t, i = share.get("fine-tuned/tome/k07/s0"), share.get("fine-tuned/imagepiece/k07/s0")
    if t is None or i is None:
        return claim(what, paper, "pending", "pending")
    here = f"share of merged tokens in the top {top:.0%}: ToMe {t:.3f}, ImagePiece {i:.3f}"
    return claim(what, paper, here, verdict(t - i, 0.025) if t >= 0.1 else "disagrees")
