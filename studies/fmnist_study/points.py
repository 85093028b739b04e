"""Operating points: for ToMe, EViT and ImagePiece, the knob values whose GMACs (counted with
``imagepiece.measure.count_gmacs`` on the study's model) come closest to the configured GMAC
reductions, so every method's curve spans the same range of compute.

Keep rates are searched in steps of 0.01; ToMe's r as a constant or as an ``(r, inflection)``
schedule (finer steps of compute than integer r alone). A numeric target a method cannot reach
within 6% is skipped for that method (EViT with prune blocks at depth/4, /2, 3/4 cannot cut
more than about 2.8x: the blocks before the first prune block run unreduced). The hyper point
is taken at or just beyond its target (up to 6%), so every curve reaches the 2.5x column of
the matched-compute table.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch

from imagepiece import make_plan
from imagepiece.measure import count_gmacs
from imagepiece.patch import use_method
from imagepiece.plan import format_method, parse_method

from .config import COHERENT, MODEL, StudyConfig

POINTS_VERSION = 1  # bump when the search changes, so cached points are searched again
METHODS = ("tome", "evit", "imagepiece")
SEEDED = ("k07", "hyper")  # the points that get the seed spread
REACH = math.log(1.06)  # a numeric target counts as reached within 6%
INFLECTIONS = (0, -0.5, 0.5, -1, 1)  # constant r first: it wins ties


@dataclass(frozen=True)
class Point:
    method: str  # tome | evit | imagepiece
    label: str  # "k07", "hyper" or "x<target>"
    spec: str  # the method spec, e.g. "evit:keep_rate=0.8"
    target: float  # the GMAC reduction aimed at
    reduction: float  # reached: baseline GMACs / GMACs of this point (plain model)
    gmacs: float
    seeded: bool

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def plain_model(cfg: StudyConfig) -> torch.nn.Module:
    """The study's architecture with random weights (GMACs do not depend on the weights)."""
    torch.manual_seed(0)
    return timm.create_model(MODEL, img_size=cfg.img_size, num_classes=10, **cfg.model_kwargs).eval()


def stem_model(cfg: StudyConfig) -> torch.nn.Module:
    """The study's architecture with ImagePiece's coherence stem in place of the linear patchify
    (random weights): the model every from-scratch arm trains, so its GMACs include the stem."""
    torch.manual_seed(0)
    return timm.create_model(COHERENT, img_size=cfg.img_size, num_classes=10, coherence="stem", plan="none",
                             **cfg.model_kwargs).eval()


def ip_spec(keep_rate: float, ip_knobs: dict[str, Any]) -> str:
    return format_method("imagepiece", {"keep_rate": keep_rate, **ip_knobs})


def candidates(method: str, cfg: StudyConfig, ip_knobs: dict[str, Any]) -> list[str]:
    keeps = [round(k / 100, 2) for k in range(95, 4, -1)]
    if method == "evit":
        return [f"evit:keep_rate={k}" for k in keeps]
    if method == "imagepiece":
        return [ip_spec(k, ip_knobs) for k in keeps]
    patches = (cfg.img_size // cfg.model_kwargs["patch_size"]) ** 2
    top = min(patches // 2, 3 * patches // cfg.depth + 1)  # beyond it every token is merged away
    return [f"tome:r={r}" if inf == 0 else f"tome:r={r};{inf}"
            for inf in INFLECTIONS for r in range(1, top + 1)]


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Count on one thread: a batch of one gains nothing from more, and on a machine whose other
    core is busy two OpenMP threads made each count a hundred times slower (measured)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def signature(spec: str, model: torch.nn.Module) -> tuple:
    """Per-block (operation, tokens in, tokens out) of ``spec`` on ``model``: specs with equal
    signatures run the same shapes and have the same GMACs, so each is counted once."""
    name, knobs = parse_method(spec)
    depth, tokens = len(model.blocks), model.patch_embed.num_patches + model.num_prefix_tokens
    steps = make_plan(name, depth, **knobs).resolve(depth, tokens, model.num_prefix_tokens)
    return tuple((s.kind, s.tokens_in, s.tokens_out) for s in steps)


def gmacs_of(model: torch.nn.Module, specs: list[str], img_size: int) -> dict[str, float]:
    x = torch.randn(1, 3, img_size, img_size)
    by_sig: dict[tuple, float] = {}
    out = {}
    with one_thread():
        for spec in specs:
            sig = signature(spec, model)
            if sig not in by_sig:
                use_method(model, spec)
                by_sig[sig] = count_gmacs(model, x)
            out[spec] = by_sig[sig]
    use_method(model, "none")
    return out


def _closest(table: dict[str, float], target: float) -> tuple[str, float]:
    """The candidate nearest to ``target`` (the first of equals); for ToMe a constant r when
    one is within 3%, as it reads more easily than a schedule."""
    def err(s: str) -> float:
        return abs(math.log(table[s] / target))

    constant = [s for s in table if s.startswith("tome:") and ";" not in s and err(s) <= math.log(1.03)]
    spec = min(constant or table, key=err)
    return spec, table[spec]


def _pick(method: str, want: float | str, table: dict[str, float], evit07: float, cfg: StudyConfig,
          ip_knobs: dict[str, Any]) -> tuple[str, str, float] | None:
    """(label, spec, target) of one target for one method, or None when out of reach."""
    if want == "k07":
        fixed = {"evit": "evit:keep_rate=0.7", "imagepiece": ip_spec(0.7, ip_knobs)}
        spec = fixed.get(method) or _closest(table, evit07)[0]
        return "k07", spec, table[fixed[method]] if method in fixed else evit07
    target = cfg.hyper if want == "hyper" else float(want)
    if want == "hyper":  # at or just beyond the target, so the matched table can interpolate there
        beyond = {s: v for s, v in table.items() if target <= v <= target * math.exp(REACH)}
        return "hyper", _closest(beyond or table, target)[0], target
    spec, reached = _closest(table, target)
    if abs(math.log(reached / target)) > REACH:
        return None
    return f"x{target:g}", spec, target


def _tables(model: torch.nn.Module, cfg: StudyConfig, ip_knobs: dict[str, Any]):
    """Per method: (method, GMACs by spec, GMAC reduction by spec, EViT keep 0.7's reduction)."""
    base = gmacs_of(model, ["none"], cfg.img_size)["none"]
    evit07 = base / gmacs_of(model, ["evit:keep_rate=0.7"], cfg.img_size)["evit:keep_rate=0.7"]
    for method in METHODS:
        gm = gmacs_of(model, candidates(method, cfg, ip_knobs), cfg.img_size)
        yield method, gm, {s: base / g for s, g in gm.items()}, evit07


def choose_points(cfg: StudyConfig, ip_knobs: dict[str, Any]) -> list[Point]:
    """Every method's operating points (see the module docstring), in target order."""
    with one_thread():
        model = plain_model(cfg)
    points: list[Point] = []
    for method, gm, table, evit07 in _tables(model, cfg, ip_knobs):
        mine: list[Point] = []
        for want in cfg.targets:
            picked = _pick(method, want, table, evit07, cfg, ip_knobs)
            if len(mine) == cfg.points_per_method or picked is None:
                continue
            label, spec, target = picked
            if spec not in {p.spec for p in mine}:
                mine.append(Point(method, label, spec, round(target, 4), round(table[spec], 4), gm[spec],
                                  label in SEEDED))
        points += mine
    return points


STEM_REACH = math.log(1.03)  # the from-scratch hyper arms: within 3% of the target (issue's rule)


def choose_stem_points(cfg: StudyConfig, ip_knobs: dict[str, Any]) -> list[Point]:
    """The from-scratch arms' operating points on the stem model: keep 0.7 (ToMe: the r whose
    GMACs come closest to EViT keep 0.7's) and the knob closest to ``cfg.hyper`` fewer GMACs than
    the stem baseline (within 3%; a method that cannot get there gets no hyper point)."""
    with one_thread():
        model = stem_model(cfg)
    points: list[Point] = []
    for method, gm, table, evit07 in _tables(model, cfg, ip_knobs):
        label, spec, target = _pick(method, "k07", table, evit07, cfg, ip_knobs)
        points.append(Point(method, label, spec, round(target, 4), round(table[spec], 4), gm[spec], True))
        spec, reached = _closest(table, cfg.hyper)
        if abs(math.log(reached / cfg.hyper)) <= STEM_REACH:
            points.append(Point(method, "hyper", spec, cfg.hyper, round(reached, 4), gm[spec], True))
    return points
