"""Every training run and every evaluated row of the study, by stage.

A *run* trains weights (the baseline, a fine-tune, the coherence stem from scratch); a *row* is
one evaluation of a run's weights under a plan (several off-the-shelf rows share the baseline).
Run names come from what they train (model, plan, seed), so two stages asking for the same
training share one run: the ImagePiece keep 0.7 seeds of the tuning stage are the curve's seeds
when the default knobs win.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from imagepiece import make_plan
from imagepiece.plan import format_method

from .config import COHERENT, MODEL, StudyConfig
from .points import Point, ip_spec

# Stages in the order they run. "checks" comes first among the fine-tunes: it trains the two
# runs that tell whether the schedule is long enough (see pipeline.checks).
STAGES = ("baseline", "offtheshelf", "checks", "tune", "curves", "seeds", "controls", "stem", "retune",
          "scratch", "speed", "analyses", "report")
BASELINE = "baseline"


@dataclass(frozen=True)
class Run:
    name: str
    stage: str
    model: str  # MODEL or COHERENT
    method: str  # the plan trained under
    seed: int
    scratch: bool  # from scratch (else fine-tuned from the baseline)
    coherence: str | None = None  # None: the model's default ("residual" for COHERENT)


@dataclass(frozen=True)
class Row:
    name: str  # e.g. "fine-tuned/evit/k07/s1"
    stage: str
    run: str
    spec: str  # the plan it is evaluated under
    group: str  # curve or control it belongs to
    kind: str  # scratch | off-the-shelf | fine-tuned | control | tune
    point: str  # operating point label ("-" for none)
    seed: int = 0


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def run_name(model: str, method: str, seed: int, scratch: bool = False, coherence: str | None = None) -> str:
    tag = coherence or ("coh" if model == COHERENT else "vit")
    return f"{'scratch' if scratch else 'ft'}-{tag}-{slug(method)}-s{seed}"


def _ft(stage: str, model: str, method: str, seed: int) -> Run:
    return Run(run_name(model, method, seed), stage, model, method, seed, scratch=False)


def tuning_candidates(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """Knob settings tried against the package defaults (``{}``), each alone, at keep 0.7.

    ``rounds2`` is ``rounds=2`` where the depth allows it; on 8 blocks only the first prune
    block has two free blocks before it, so there it is two rounds before block 2 and one before
    the others (``retokenize_blocks``), and it is left out when nothing can get a second round.
    """
    out: dict[str, dict[str, Any]] = {"default": {}, "pairs_only": {"pairs_only": True},
                                      "size_norm": {"size_norm": True},
                                      "fused_bias_off": {"fused_bias": False}}
    try:
        make_plan("imagepiece", cfg.depth, rounds=2)
        out["rounds2"] = {"rounds": 2}
    except ValueError:
        blocks = _two_rounds_where_free(cfg.depth)
        if blocks is not None:
            out["rounds2"] = {"retokenize_blocks": blocks}
    return out


def retune_candidates(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """The second tuning round: knobs the first round left at their defaults, each alone, on top
    of the first round's choice. ``early`` re-tokenizes right after the first block as well as
    before each prune block (the reviews' "at the token-generation stage"); left out when the
    default schedule already re-tokenizes in block 0. A merge share above 0.5 cannot be asked
    of one round (only the A half of the non-semantic set can merge away: ``Retokenize``
    refuses it); two rounds, which merge up to three quarters, were the first round's
    ``rounds2``."""
    out: dict[str, dict[str, Any]] = {f"locality{v:g}": {"locality": v} for v in (0.0, 0.3, 1.0)}
    out["merge_share0.25"] = {"merge_share": 0.25}
    default = make_plan("imagepiece", cfg.depth)
    ones = tuple(i for i, op in enumerate(default.ops) if type(op).__name__ == "Retokenize")
    if ones and ones[0] > 0:
        out["early"] = {"retokenize_blocks": (0,) + ones}
    return out


def _two_rounds_where_free(depth: int) -> tuple[int, ...] | None:
    from imagepiece.plan import default_blocks

    out, prev = [], -1
    for b in default_blocks(depth):
        free = list(range(prev + 1, b))
        out += free[-2:]
        prev = b
    default = make_plan("imagepiece", depth)
    ones = tuple(i for i, op in enumerate(default.ops) if type(op).__name__ == "Retokenize")
    return tuple(out) if tuple(out) != ones else None


def _point(points: list[Point], method: str, label: str) -> Point:
    return next(p for p in points if p.method == method and p.label == label)


def _model_of(method: str) -> str:
    return COHERENT if method == "imagepiece" else MODEL


def build(cfg: StudyConfig, points: list[Point], ip_knobs: dict[str, Any],
          scratch: Scratch | None = None) -> tuple[list[Run], list[Row]]:
    """All runs (deduplicated by name, first stage wins) and rows, in stage order. ``scratch``
    adds the from-scratch arms (left out until their operating points are known)."""
    runs: dict[str, Run] = {}
    rows: list[Row] = []

    def add(run: Run, row: Row) -> None:
        runs.setdefault(run.name, run)
        rows.append(row)

    base = Run(BASELINE, "baseline", MODEL, "none", 0, scratch=True)
    add(base, Row("scratch/baseline", "baseline", BASELINE, "none", "baseline", "scratch", "-"))
    for p in points:
        rows.append(Row(f"off-the-shelf/{p.method}/{p.label}", "offtheshelf", BASELINE, p.spec, p.method,
                        "off-the-shelf", p.label))
    _checks(cfg, points, add)
    _tuning(cfg, add)
    _curves(cfg, points, add)
    _controls(cfg, points, ip_knobs, add)
    stem_method = ip_spec(0.7, ip_knobs)
    stem = Run(run_name(COHERENT, stem_method, 0, True, "stem"), "stem", COHERENT, stem_method, 0, True,
               "stem")
    add(stem, Row("control/imagepiece-stem/k07", "stem", stem.name, stem_method, "imagepiece-stem", "control",
                  "k07"))
    _retune(cfg, ip_knobs, add)
    if scratch is not None:
        _scratch(cfg, scratch, add)
    return list(runs.values()), rows


def _checks(cfg: StudyConfig, points: list[Point], add) -> None:
    ft = _ft("checks", MODEL, "none", 0)
    add(ft, Row("control/baseline-finetuned", "checks", ft.name, "none", "baseline-finetuned", "control",
                "-"))
    evit = _point(points, "evit", "k07")
    run = _ft("checks", MODEL, evit.spec, 0)
    add(run, Row("fine-tuned/evit/k07/s0", "checks", run.name, evit.spec, "evit", "fine-tuned", "k07", 0))


def _tuning(cfg: StudyConfig, add) -> None:
    for cand, knobs in tuning_candidates(cfg).items():
        seeds = cfg.seeds if cand == "default" else cfg.seeds[:1]
        for seed in seeds:
            run = _ft("tune", COHERENT, ip_spec(0.7, knobs), seed)
            add(run, Row(f"tune/{cand}/s{seed}", "tune", run.name, run.method, cand, "tune", "k07", seed))


def _retune(cfg: StudyConfig, ip_knobs: dict[str, Any], add) -> None:
    """Each second-round candidate (one seed) and, as the reference it must beat, the first
    round's choice at every seed (the same runs as the curve's keep-0.7 seeds)."""
    for seed in cfg.seeds:
        run = _ft("retune", COHERENT, ip_spec(0.7, ip_knobs), seed)
        add(run, Row(f"retune/reference/s{seed}", "retune", run.name, run.method, "reference", "tune", "k07",
                     seed))
    for cand, knobs in retune_candidates(cfg).items():
        run = _ft("retune", COHERENT, ip_spec(0.7, {**ip_knobs, **knobs}), cfg.seeds[0])
        add(run, Row(f"retune/{cand}/s{cfg.seeds[0]}", "retune", run.name, run.method, cand, "tune", "k07",
                     cfg.seeds[0]))


@dataclass(frozen=True)
class Scratch:
    """What the from-scratch arms need: their operating points on the stem model, and whether
    ImagePiece's knobs are settled (its arms wait for the second tuning round)."""

    points: tuple[Point, ...]
    imagepiece_ready: bool


SCRATCH_SEEDS = 2  # seeds of every keep-0.7 arm and the stem baseline (hyper: the first, then the second)


def scratch_order(cfg: StudyConfig) -> list[tuple[str, str, int]]:
    """(arm, point, seed) of every from-scratch arm, in the order they train: a partial study
    first gives the keep-0.7 comparison at seed 0, then its second seed, then hyper-speed, then
    the coherence ablation (ImagePiece from scratch without the stem), then hyper's second seed."""
    first, second = cfg.seeds[:SCRATCH_SEEDS]
    k07 = ("none", "evit", "tome", "imagepiece")
    hyper = ("evit", "tome", "imagepiece")
    return ([(m, "-" if m == "none" else "k07", first) for m in k07]
            + [(m, "-" if m == "none" else "k07", second) for m in k07]
            + [(m, "hyper", first) for m in hyper] + [("imagepiece-nostem", "k07", first)]
            + [(m, "hyper", second) for m in hyper])


def _scratch(cfg: StudyConfig, scratch: Scratch, add) -> None:
    by = {(p.method, p.label): p for p in scratch.points}
    for arm, label, seed in scratch_order(cfg):
        method = arm.split("-")[0]
        if method == "imagepiece" and not scratch.imagepiece_ready:
            continue
        point = by.get((method, label))
        if method != "none" and point is None:  # no knob reaches the target within 3%
            continue
        spec = "none" if method == "none" else point.spec
        stem = arm != "imagepiece-nostem"
        model, coherence = (COHERENT, "stem") if stem else (MODEL, None)
        run = Run(run_name(model, spec, seed, True, coherence), "scratch", model, spec, seed, True, coherence)
        add(run, Row(f"from-scratch/{arm}/{label}/s{seed}", "scratch", run.name, spec, arm, "from-scratch",
                     label, seed))


def _curves(cfg: StudyConfig, points: list[Point], add) -> None:
    for stage in ("curves", "seeds"):
        for p in points:
            seeds = cfg.seeds[:1] if stage == "curves" else (cfg.seeds[1:] if p.seeded else ())
            for seed in seeds:
                run = _ft(stage, _model_of(p.method), p.spec, seed)
                name = f"fine-tuned/{p.method}/{p.label}/s{seed}"
                if not (p.method == "evit" and p.label == "k07" and seed == cfg.seeds[0]):  # in checks
                    add(run, Row(name, stage, run.name, p.spec, p.method, "fine-tuned", p.label, seed))


def _controls(cfg: StudyConfig, points: list[Point], ip_knobs: dict[str, Any], add) -> None:
    evit, ip = _point(points, "evit", "k07"), _point(points, "imagepiece", "k07")
    tome = _point(points, "tome", "k07")
    r = tome.spec.partition("r=")[2]
    ip_tome = format_method("imagepiece+tome", {"r": r})
    for group, model, spec in (("evit+coherence", COHERENT, evit.spec),
                               ("imagepiece-nocoherence", MODEL, ip.spec),
                               ("imagepiece+tome", COHERENT, ip_tome)):
        run = _ft("controls", model, spec, 0)
        add(run, Row(f"control/{group}/k07", "controls", run.name, spec, group, "control", "k07"))
