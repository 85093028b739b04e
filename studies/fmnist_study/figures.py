"""The study's figures (top-1 against GMACs and against measured speed-up) and its markdown."""

from __future__ import annotations

from typing import Any

from .paired import MIN_OWN_SEEDS, MIN_POOLED_DOF
from .report import KINDS, METHODS

COLOURS = {"tome": "tab:blue", "evit": "tab:orange", "imagepiece": "tab:green"}
CONTROLS = {"evit+coherence": "s", "imagepiece-nocoherence": "v", "imagepiece+tome": "D",
            "imagepiece-stem": "P", "baseline-finetuned": "*"}


def _x(rec: dict[str, Any], axis: str) -> float | None:
    return rec["gmacs"] * 1000 if axis == "gmacs" else rec["speedup"]


def plot_curves(S: dict[str, Any], path: str, axis: str = "gmacs") -> None:
    """Two panels, fine-tuned (with the controls) and off-the-shelf, one curve per method; error
    bars are the seed range; dotted lines mark the matched-compute targets. Separate panels
    because the off-the-shelf curves span 40 points of top-1 and would flatten the fine-tuned
    ones, whose differences are fractions of a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(12, 4.8), dpi=120)
    for ax, kind in zip(axes, KINDS, strict=True):
        _panel(ax, S, kind, axis)
    fig.suptitle(f"Fashion-MNIST ({S['config']}): top-1 against {'compute' if axis == 'gmacs' else 'speed'}")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _panel(ax: Any, S: dict[str, Any], kind: str, axis: str) -> None:
    for m in METHODS:
        pts = sorted((c for c in S["curve"] if c["kind"] == kind and c["group"] == m
                      and _x(c, axis) is not None), key=lambda c: _x(c, axis))
        if pts:
            ax.errorbar([_x(c, axis) for c in pts], [c["mean"] for c in pts],
                        yerr=[[c["mean"] - c["min"] for c in pts], [c["max"] - c["mean"] for c in pts]],
                        color=COLOURS[m], marker="o" if kind == "fine-tuned" else "x", capsize=3, label=m)
    if kind == "fine-tuned":
        for c in S["controls"]:
            if _x(c, axis) is not None:
                ax.plot(_x(c, axis), c["mean"], CONTROLS.get(c["group"], "o"), color="grey", label=c["group"])
    base = S.get("base")
    if base and _x(base, axis) is not None:
        ax.plot(_x(base, axis), base["mean"], "k*", markersize=12, label="baseline")
    for r in S["matched_at"]:
        ax.axvline(S["base_gmacs"] * 1000 / r if axis == "gmacs" else r, color="k", linestyle=":", alpha=0.4)
    ax.set_xlabel("MMACs per image" if axis == "gmacs" else "images/s relative to the baseline (one run)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(kind)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in r) + " |" for r in rows])


def _num(v: Any, f: str = ".2f") -> str:
    return "–" if v is None else format(v, f)


def _acc(c: dict[str, Any]) -> str:
    return f"{c['mean']:.2f} ± {c['std']:.2f} (n={c['n']})" if c["n"] > 1 else f"{c['mean']:.2f}"


def markdown(S: dict[str, Any]) -> str:
    parts = [f"Configuration `{S['config']}`; {S['setup']}\n", "### Checks\n",
             table(["check", "value", "target", "result"], S["checks"]), "\n### Operating points\n",
             table(["method", "point", "spec", "target", "GMAC reduction"],
                   [[p["method"], p["label"], f"`{p['spec']}`", p["target"], f"{p['reduction']:.2f}x"]
                    for p in S["points"]]), "\n### Curves (test top-1)\n",
             table(["training", "method", "point", "MMACs", "speed-up", "test top-1 (%)", "val top-1"],
                   [[c["kind"], c["group"], c["point"], _num(c["gmacs"] * 1000, ".1f"), _num(c["speedup"]),
                     _acc(c), _num(c["val_mean"])] for c in S["curve"] + S["controls"]]),
             "\n### Accuracy at matched compute (interpolated on each curve)\n", matched_md(S),
             "\n### Trained from scratch, coherence stem on every arm (the paper's protocol)\n",
             scratch_md(S),
             "\n### Tuning (validation split, ImagePiece keep 0.7)\n", tuning_md(S),
             "\n### Second tuning round (validation split; sets the from-scratch ImagePiece knobs)\n",
             tuning_md({"tuning": S["tuning"].get("retune", {})}),
             "\n### Claims\n", table(["claim", "paper", "here", "verdict"],
                                     [[c["claim"], c["paper"], c["here"], f"**{c['verdict']}**"]
                                      for c in S["claims"]]),
             "\n### Speed measurement\n", S["speed_note"], "\n### Every row\n",
             table(["row", "val", "test", "MMACs", "reproduce"],
                   [[t["row"], _num(t["val_top1"]), _num(t["test_top1"]), _num(t["gmacs"] * 1000, ".1f"),
                     f"`{t['command']}`"] for t in S["table"]])]
    return "\n".join(parts) + "\n"


def matched_md(S: dict[str, Any]) -> str:
    cols = [f"top1_at_{r:g}x_{a}" for a in ("gmacs", "speed") for r in S["matched_at"]]
    head = [f"{r:g}x fewer GMACs" for r in S["matched_at"]] + [f"{r:g}x images/s" for r in S["matched_at"]]
    return table(["training", "method"] + head,
                 [[m["kind"], m["method"]] + [_num(m[c]) for c in cols] for m in S["matched"]])


def _interval(r: dict[str, Any], name: str) -> str:
    d = r.get(f"vs_{name}_diff")
    return "-" if d is None else f"{d:+.2f} [{r[f'vs_{name}_lo']:+.2f}, {r[f'vs_{name}_hi']:+.2f}]"


def _pooled_source(pooled: dict[str, float]) -> str:
    """Where the from-scratch pooled seed std comes from, for the table's note."""
    dof = int(pooled.get("from-scratch-dof", 0))
    if dof >= MIN_POOLED_DOF:
        return f", from the from-scratch arms' own seeds ({dof} degrees of freedom)"
    return (f", pooled over every seeded group of the study: the from-scratch arms' own seeds give "
            f"{dof} of the {MIN_POOLED_DOF} degrees of freedom needed to use them alone"
            + ("" if dof == 0 else f" (their own: {pooled['from-scratch-own']:.2f})")
            + f"; an arm's own std is used from {MIN_OWN_SEEDS} seeds")


def scratch_md(S: dict[str, Any]) -> str:
    rows = [[r["arm"], r["point"], f"`{r['spec']}`", r["seeds"], _num(r["mmacs"], ".1f"),
             _num(r["speed_vs_stem_baseline"]), _num(r["val_top1"]),
             _num(r["test_top1"]) + ("" if r["test_std"] is None else f" ± {r['test_std']:.2f}"),
             _interval(r, "evit"), _interval(r, "stem_baseline")] for r in S["scratch"]]
    pooled = S["pooled"]
    note = (f"\n\nDifferences: test top-1 points, 95% interval of a paired bootstrap over the test images "
            f"combined with the seed spread (pooled seed std {pooled['from-scratch']:.2f}"
            + _pooled_source(pooled)
            + "). Images/s: ratio to the stem baseline in the study's speed run.\n")
    return table(["arm", "point", "spec", "seeds", "MMACs", "images/s vs stem baseline", "val top-1",
                  "test top-1", "vs EViT", "vs stem baseline"], rows) + note


def tuning_md(S: dict[str, Any]) -> str:
    tu = S["tuning"]
    rows = [[c["candidate"], f"`{c['knobs']}`", c["val"], c["seeds"]] for c in tu.get("candidates", [])]
    return table(["candidate", "knobs", "val top-1", "seeds"], rows) + f"\n\nDecision: {tu.get('decision')}\n"
