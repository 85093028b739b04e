"""``imagepiece tune``: the fastest plan that keeps your accuracy, on your model and your data.

For each method (ToMe, EViT, ImagePiece by default, or given specs) the knob values are chosen
adaptively, not from a fixed grid: first from GMACs (deterministic, counted from the ops that
run), spread geometrically over compute reductions from about 1.2x to the largest the knob
allows; then refined by measurement, adding a value where the measured speed-ups of
neighbouring rows leave a wide gap. Every variant is scored (top-1 with its binomial standard
error) on the same images, and all are timed interleaved in one process on one batch of the
data (see :func:`imagepiece.bench.time_interleaved`). The rows on the Pareto front of (speed-up,
top-1) are marked, and :func:`pick` chooses the plan for a target speed-up or accuracy drop.

Library use::

    from imagepiece.tune import tune, plan_at_compute
    result = tune(model, loader, target_speedup=1.5)
    print(result.chosen.python_line())      # imagepiece.patch(model, "evit:keep_rate=0.52")
    plan_at_compute(model, "evit", 2.0)     # EViT at 2x fewer GMACs, no sweep
"""

from __future__ import annotations

import copy
import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .distributed import check_device
from .evaluate import evaluate_model
from .loading import SHIPPED_PREFIX, ModelLoadError, open_model
from .measure import BACKENDS, DTYPES, build, check_dtype, count_gmacs, time_interleaved

# bench's output-path check, shared so tune refuses the paths bench refuses
from .options import check_outputs
from .patch import describe, patch, unpatch
from .plan import format_method, parse_method, preset_knobs

__all__ = ["DEFAULT_METHODS", "TuneError", "TuneResult", "TuneRow", "candidate_knobs", "knob_for_gmacs",
           "pareto", "pick", "plan_at_compute", "tune"]

DEFAULT_METHODS = ("tome", "evit", "imagepiece")
MIN_KEEP_RATE = 0.05  # below this EViT-style plans keep a token or two per prune block
LOW_SPEEDUP = 1.2  # the mildest compute reduction swept


class TuneError(ValueError):
    """A tune request that cannot run (bad option, a method without a sweepable knob, ...)."""


@dataclass
class TuneRow:
    """One variant: its spec, knob, compute and what was measured (None: not measured)."""

    method: str  # the spec: "evit:keep_rate=0.52"
    preset: str
    knob: str | None
    value: Any
    gmacs: float
    gmac_reduction: float  # unmodified GMACs / these GMACs
    top1: float | None = None  # percent
    top1_se: float | None = None  # binomial standard error, points
    images: int = 0
    images_per_s: float | None = None
    speedup: float | None = None
    pareto: bool = False
    error: str | None = None

    def python_line(self) -> str:
        return f'imagepiece.patch(model, "{self.method}")'

    def cli_spec(self) -> str:
        return f"--method {self.method}"


@dataclass
class TuneResult:
    rows: list[TuneRow]
    chosen: TuneRow | None
    rule: str | None  # what the choice met, in words
    setup: dict[str, Any] = field(default_factory=dict)
    interrupted: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"setup": self.setup, "interrupted": self.interrupted, "rule": self.rule,
                "chosen": asdict(self.chosen) if self.chosen else None,
                "rows": [asdict(r) for r in self.rows]}


# --------------------------------------------------------------------------------------
# Pareto front and choice (pure functions of the table)
# --------------------------------------------------------------------------------------


def pareto(rows: Sequence[TuneRow]) -> list[TuneRow]:
    """Mark (and return) the measured rows no other row beats on both speed-up and top-1."""
    done = [r for r in rows if r.top1 is not None and r.speedup is not None]
    for r in rows:
        r.pareto = r in done and not any(
            o.speedup >= r.speedup and o.top1 >= r.top1 and (o.speedup > r.speedup or o.top1 > r.top1)
            for o in done)
    return [r for r in rows if r.pareto]


def pick(rows: Sequence[TuneRow], target_speedup: float | None = None,
         max_drop: float | None = None) -> tuple[TuneRow | None, str | None]:
    """The plan for a target: with ``target_speedup`` the most accurate row at least that fast;
    with ``max_drop`` (points of top-1 below the unmodified model) the fastest row within it;
    with both, the most accurate row meeting both. ``(None, why)`` when no row meets it."""
    if target_speedup is None and max_drop is None:
        return None, None
    done = [r for r in rows if r.top1 is not None and r.speedup is not None]
    base = next((r for r in done if r.preset == "none"), None)
    if max_drop is not None and base is None:
        return None, "no measured unmodified row to count the drop from"
    ok = [r for r in done if (target_speedup is None or r.speedup >= target_speedup)
          and (max_drop is None or r.top1 >= base.top1 - max_drop)]
    want = " and ".join(w for w in (f"speed-up >= {target_speedup:g}x" if target_speedup else "",
                                    f"top-1 drop <= {max_drop:g} points" if max_drop is not None else "")
                        if w)
    if not ok:
        return None, f"no measured plan meets {want}"
    if target_speedup is None:
        best = max(ok, key=lambda r: (r.speedup, r.top1))
        return best, f"the fastest plan with {want}"
    best = max(ok, key=lambda r: (r.top1, r.speedup))
    return best, f"the most accurate plan with {want}"


# --------------------------------------------------------------------------------------
# Knob search on GMACs (deterministic)
# --------------------------------------------------------------------------------------


def _knob(preset: str) -> str:
    knobs = preset_knobs(preset)
    for name in ("keep_rate", "r"):
        if name in knobs:
            return name
    raise TuneError(f"method {preset!r} has no keep_rate or r knob to sweep; sweepable: tome, evit, "
                    "imagepiece, imagepiece-discard, imagepiece+tome")


class _Gmacs:
    """GMACs per image of ``model`` under plans, counted once per plan (the model is patched in
    place while counting and unpatched after)."""

    def __init__(self, model: nn.Module):
        self.model = unpatch(copy.deepcopy(model))  # the caller's model is left as it is
        info = describe(model)
        self.x = torch.zeros(1, info.in_chans, *info.image_size)
        self.patches = info.num_tokens
        self.cache: dict[str, float] = {}
        self.base = self.of("none", {})

    def of(self, preset: str, knobs: dict[str, Any]) -> float:
        spec = format_method(preset, knobs)
        if spec not in self.cache:
            try:
                patch(self.model, preset, **knobs)
                self.cache[spec] = count_gmacs(self.model, self.x)
            finally:
                unpatch(self.model)
        return self.cache[spec]

    def reduction(self, preset: str, knobs: dict[str, Any]) -> float:
        return self.base / self.of(preset, knobs)


def _extreme(preset: str, knob: str, counter: _Gmacs) -> Any:
    return MIN_KEEP_RATE if knob == "keep_rate" else counter.patches // 2


def knob_for_gmacs(counter: _Gmacs, preset: str, target: float, fixed: dict[str, Any] | None = None
                   ) -> tuple[Any, float] | None:
    """The mildest knob value whose GMACs are at least ``target`` times fewer than unmodified:
    ``(value, reduction)``, or None when even the extreme value does not reach it."""
    fixed = dict(fixed or {})
    knob = _knob(preset)

    def red(v: Any) -> float:
        return counter.reduction(preset, {**fixed, knob: v})

    lo, hi = (MIN_KEEP_RATE, 1.0) if knob == "keep_rate" else (1, _extreme(preset, knob, counter))
    strongest = lo if knob == "keep_rate" else hi
    if red(strongest) < target:
        return None
    if knob == "r":  # smallest r that reaches the target
        while lo < hi:
            mid = (lo + hi) // 2
            lo, hi = (lo, mid) if red(mid) >= target else (mid + 1, hi)
        return hi, red(hi)
    for _ in range(20):  # largest keep rate that reaches the target, to 2 decimals
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if red(mid) >= target else (lo, mid)
        if hi - lo < 0.005:
            break
    value = math.floor(lo * 100) / 100
    return value, red(value)


def candidate_knobs(counter: _Gmacs, preset: str, points: int = 5, fixed: dict[str, Any] | None = None,
                    low: float = LOW_SPEEDUP) -> list[tuple[Any, float]]:
    """``points`` knob values spread geometrically in GMAC reduction from ``low`` to the largest
    the knob allows; duplicates (integer ``r``) dropped."""
    knob = _knob(preset)
    top = counter.reduction(preset, {**(fixed or {}), knob: _extreme(preset, knob, counter)})
    if top < low:
        return []
    targets = [low * (top / low) ** (i / max(points - 1, 1)) for i in range(points)]
    out: dict[Any, float] = {}
    for t in targets:
        found = knob_for_gmacs(counter, preset, t * (1 - 1e-9), fixed)
        if found is not None:
            out.setdefault(found[0], found[1])
    return list(out.items())


def plan_at_compute(model: nn.Module, method: str, reduction: float) -> tuple[str, Any, float]:
    """``method`` (a preset or spec, e.g. ``"evit"``) at ``reduction`` times fewer GMACs, with
    no sweep: ``(spec, knob value, reached reduction)``, e.g. ``("evit:keep_rate=0.44", 0.44,
    2.01)``. Raises :class:`TuneError` when the method cannot reduce that much."""
    if isinstance(reduction, bool) or not isinstance(reduction, (int, float)) or reduction < 1:
        raise TuneError(f"reduction={reduction!r} is not allowed; expected a number >= 1")
    preset, fixed = parse_method(method)
    knob = _knob(preset)
    if knob in fixed:
        raise TuneError(f"{method!r} fixes {knob}, the knob that is searched; leave it out")
    counter = _Gmacs(model)
    found = knob_for_gmacs(counter, preset, reduction, fixed)
    if found is None:
        top = counter.reduction(preset, {**fixed, knob: _extreme(preset, knob, counter)})
        raise TuneError(f"{preset} reaches at most {top:.2f}x fewer GMACs on this model, not {reduction:g}x")
    return format_method(preset, {**fixed, knob: found[0]}), found[0], found[1]


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


@dataclass
class TuneOptions:
    """How to measure: the user's batch size, device, dtype (autocast) and backend."""

    batch_size: int = 64
    device: str = "cpu"
    dtype: str = "fp32"
    backend: str = "eager"  # eager, compile, onnxruntime (as in ``bench``)
    warmup: int = 2
    runs: int = 10
    points: int = 5  # knob values per method from GMACs
    refine: int = 2  # extra values per method where measured speed-ups leave gaps
    seed: int = 0


def check_options(opts: TuneOptions, target_speedup: float | None = None,
                  max_drop: float | None = None) -> None:
    """Every option in its range, before any work; :class:`TuneError` naming the bad value."""
    try:
        if opts.device != "mps":
            check_device(opts.device)
        dtype = check_dtype(opts.dtype)
    except ValueError as e:
        raise TuneError(str(e)) from None
    if opts.device == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise TuneError("device 'mps' was asked for but torch has no MPS device on this machine; "
                        "allowed here: cpu" + (", cuda" if torch.cuda.is_available() else ""))
    if opts.backend not in BACKENDS:
        raise TuneError(f"unknown backend {opts.backend!r}; allowed: {', '.join(BACKENDS)}")
    if opts.backend == "onnxruntime" and (opts.device != "cpu" or dtype != "fp32"):
        raise TuneError("backend 'onnxruntime' runs on the CPU in fp32 only; allowed there: eager, compile")
    for name, low in (("batch_size", 1), ("runs", 1), ("warmup", 0), ("points", 1), ("refine", 0)):
        v = getattr(opts, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise TuneError(f"{name}={v!r} is not allowed; expected an integer >= {low}")
    if target_speedup is not None and not (isinstance(target_speedup, (int, float)) and target_speedup > 0):
        raise TuneError(f"target_speedup={target_speedup!r} is not allowed; expected a number > 0, e.g. 1.5")
    if max_drop is not None and not (isinstance(max_drop, (int, float)) and max_drop >= 0):
        raise TuneError(f"max_drop={max_drop!r} is not allowed; expected points of top-1 >= 0, e.g. 1.0")


def _rows_for(counter: _Gmacs, specs: Sequence[str], points: int) -> list[TuneRow]:
    """The unmodified row, then each spec swept over its knob (taken as is when it fixes it)."""
    rows = [TuneRow("none", "none", None, None, counter.base, 1.0)]
    for spec in specs:
        preset, fixed = parse_method(spec)
        if preset == "none":
            continue
        knob = _knob(preset)
        swept = [fixed.pop(knob)] if knob in fixed else None
        values = swept or [v for v, _ in candidate_knobs(counter, preset, points, fixed)]
        for value in values:
            knobs = {**fixed, knob: value}
            rows.append(TuneRow(format_method(preset, knobs), preset, knob, value,
                                counter.of(preset, knobs), counter.reduction(preset, knobs)))
    seen: set[str] = set()
    return [r for r in rows if not (r.method in seen or seen.add(r.method))]


def _refine(counter: _Gmacs, rows: list[TuneRow], per_method: int, gap: float = 1.15) -> list[TuneRow]:
    """New rows where the measured speed-ups of neighbouring rows of one method (the unmodified
    model counting as 1.0x) differ by more than ``gap``: a knob at the geometric mean of their
    GMAC reductions, widest gaps first, at most ``per_method`` per method."""
    new: list[TuneRow] = []
    base = next(r for r in rows if r.preset == "none")
    for preset in dict.fromkeys(r.preset for r in rows if r.knob):
        mine = sorted((r for r in rows if r.preset == preset and r.speedup), key=lambda r: r.speedup)
        if not mine or not base.speedup:
            continue
        fixed = {k: v for k, v in parse_method(mine[0].method)[1].items() if k != mine[0].knob}
        pairs = sorted(zip([base, *mine[:-1]], mine, strict=True), key=lambda p: p[0].speedup / p[1].speedup)
        for a, b in pairs[:per_method]:
            if b.speedup / a.speedup <= gap:
                continue
            found = knob_for_gmacs(counter, preset, math.sqrt(a.gmac_reduction * b.gmac_reduction), fixed)
            if found is None:
                continue
            knobs = {**fixed, b.knob: found[0]}
            spec = format_method(preset, knobs)
            if all(r.method != spec for r in rows + new):
                new.append(TuneRow(spec, preset, b.knob, found[0], counter.of(preset, knobs), found[1]))
    return new


def _speeds(models: dict[str, nn.Module], x: torch.Tensor, opts: TuneOptions, runs: int,
            step: Callable[[str], None]) -> tuple[dict[str, float], dict[str, str]]:
    """Median images/s of each model on ``x`` (every model once per round, in a new random order
    each round), and why a model could not run under the backend."""
    dt = DTYPES[check_dtype(opts.dtype)]

    def autocast():
        return torch.autocast(x.device.type, dtype=dt, enabled=dt != torch.float32)

    fns, errors = {}, {}
    for key, m in models.items():
        fn, _, err = build(m, opts.backend, "inference", x, torch.get_num_threads(), autocast, dt)
        if fn is None:
            errors[key] = err
        else:
            fns[key] = fn
    with autocast():
        times = time_interleaved(fns, x, opts.warmup, runs, random.Random(opts.seed), step)
    return {k: len(x) / statistics.median(t) for k, t in times.items()}, errors


def _set_speeds(rows: list[TuneRow], ips: dict[str, float], errors: dict[str, str]) -> None:
    base = ips.get("none")
    for r in rows:
        r.error = errors.get(r.method, r.error)
        if r.method in ips:
            r.images_per_s = ips[r.method]
            r.speedup = ips[r.method] / base if base else None


def _score(row: TuneRow, model: nn.Module, loader: Any, opts: TuneOptions) -> None:
    """Top-1 (percent) of ``model`` on the loader, with the binomial standard error in points."""
    amp = opts.dtype != "fp32" and opts.device.startswith("cuda")
    result = evaluate_model(model, loader, opts.device, amp=amp)
    p = result["top1"] / 100
    row.top1, row.images = result["top1"], result["images"]
    row.top1_se = 100 * math.sqrt(p * (1 - p) / result["images"])


class _Progress:
    def __init__(self, progress: Callable[[int, int, str], None] | None):
        self.progress, self.done, self.total = progress, 0, 0

    def add(self, n: int) -> None:
        self.total += n

    def __call__(self, what: str) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress(self.done, self.total, what)


def tune(model: nn.Module, loader: Any, methods: Sequence[str] = DEFAULT_METHODS,
         options: TuneOptions | None = None, target_speedup: float | None = None,
         max_drop: float | None = None, progress: Callable[[int, int, str], None] | None = None,
         setup: dict[str, Any] | None = None) -> TuneResult:
    """Sweep ``methods`` on ``model`` (left unchanged) over the labelled ``loader``; return the
    measured table (Pareto rows marked) and the plan :func:`pick` chooses for the target.

    Steps: knob values from GMACs; a short interleaved timing of them; extra values where the
    measured speed-ups leave gaps; top-1 of every variant; the final interleaved timing. Ctrl-C
    (``KeyboardInterrupt``) ends the run early and returns the rows measured so far, with
    ``interrupted`` set.
    """
    opts = options or TuneOptions()
    check_options(opts, target_speedup, max_drop)
    for spec in methods:
        try:
            parse_method(spec)
        except ValueError as e:
            raise TuneError(str(e)) from None
    counter = _Gmacs(model)
    rows = _rows_for(counter, methods, opts.points)
    x = next(iter(loader))[0][: opts.batch_size].to(opts.device)
    tick = _Progress(progress)
    result = TuneResult(rows, None, None, dict(setup or {}))
    result.setup.update(asdict(opts), methods=list(methods), timed_batch=len(x),
                        threads=torch.get_num_threads())
    models: dict[str, nn.Module] = {}
    try:
        _measure(counter, rows, models, loader, x, opts, tick)
    except KeyboardInterrupt:
        result.interrupted = True
    finally:
        models.clear()
    pareto(rows)
    result.chosen, result.rule = pick(rows, target_speedup, max_drop)
    return result


def _variant(base: nn.Module, row: TuneRow, device: str) -> nn.Module:
    model = copy.deepcopy(base)
    return (model if row.preset == "none" else patch(model, row.method)).to(device).eval()


def _measure(counter: _Gmacs, rows: list[TuneRow], models: dict[str, nn.Module], loader: Any,
             x: torch.Tensor, opts: TuneOptions, tick: _Progress) -> None:
    """Fill ``rows`` in place (adding the refined ones), so an interruption keeps what is done."""
    base = counter.model
    quick = max(2, opts.runs // 3)
    models.update({r.method: _variant(base, r, opts.device) for r in rows})
    tick.add(len(rows) * (opts.warmup + quick))
    _set_speeds(rows, *_speeds(models, x, opts, quick, lambda k: tick(f"first timing: {k}")))
    added = _refine(counter, rows, opts.refine)
    rows += added
    models.update({r.method: _variant(base, r, opts.device) for r in added})
    tick.add(len(rows) + len(rows) * (opts.warmup + opts.runs))
    for r in rows:
        _score(r, models[r.method], loader, opts)
        tick(f"top-1: {r.method}")
    _set_speeds(rows, *_speeds(models, x, opts, opts.runs, lambda k: tick(f"timing: {k}")))


# --------------------------------------------------------------------------------------
# Model and data for the command
# --------------------------------------------------------------------------------------

DATASETS = ("fashion-mnist", "imagefolder", "synthetic")


def load_data(kind: str, root: str | None, split: str, prep: Any, max_images: int, num_classes: int,
              seed: int = 0) -> Any:
    """The labelled dataset prepared with ``prep`` (a :class:`~imagepiece.preprocess.Preprocessing`),
    cut to a fixed random subset of ``max_images`` images (the same for a given ``seed``); its
    class count must be the model's."""
    from torch.utils.data import Subset

    from .data import build_dataset, num_classes_of

    if kind not in DATASETS:
        raise TuneError(f"dataset={kind!r} is not allowed; allowed: {', '.join(DATASETS)}")
    if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
        raise TuneError(f"max_images={max_images!r} is not allowed; expected an integer >= 1")
    try:
        ds = build_dataset(kind, root, split, prep.img_size, train_transform=False,
                           transform_cfg=prep.transform_config(), num_classes=num_classes,
                           length=max_images if kind == "synthetic" else None, seed=seed)
    except ValueError as e:  # DataError: missing folder, bad split, ...
        raise TuneError(str(e)) from None
    classes = num_classes_of(ds)
    if classes != num_classes:
        raise TuneError(f"the model has {num_classes} outputs but the data has {classes} classes; give a "
                        "model trained on these classes (or data with the model's classes)")
    if len(ds) > max_images:
        pick_ = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:max_images]
        ds = Subset(ds, sorted(pick_.tolist()))
    return ds


@dataclass
class TuneRequest:
    """Everything ``imagepiece tune`` is asked: model, data, preprocessing overrides, methods,
    measurement options, target and outputs."""

    model: str = SHIPPED_PREFIX + "baseline"
    checkpoint: str | None = None
    pretrained: bool = False
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "fashion-mnist"
    data_root: str | None = None
    split: str = "test"
    max_images: int = 2000
    methods: Sequence[str] = DEFAULT_METHODS
    options: TuneOptions = field(default_factory=TuneOptions)
    target_speedup: float | None = None
    max_drop: float | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)  # mean, std, crop_pct, ...
    json_path: str | None = None
    csv_path: str | None = None
    plot_path: str | None = None


def run_request(req: TuneRequest, progress: Callable[[int, int, str], None] | None = None) -> TuneResult:
    """Check ``req`` (outputs, options, methods) before any work, load the model and its data with
    the model's own preprocessing, and :func:`tune`. Raises :class:`TuneError`."""
    from .evaluate import make_eval_loader, num_outputs
    from .preprocess import resolve_preprocessing

    try:
        check_outputs(req.json_path, req.csv_path, req.plot_path)
        for spec in req.methods:
            parse_method(spec)
    except ValueError as e:
        raise TuneError(str(e)) from None
    check_options(req.options, req.target_speedup, req.max_drop)
    try:
        opened = open_model(req.model, req.checkpoint, req.pretrained, req.model_kwargs)
    except ModelLoadError as e:
        raise TuneError(str(e)) from None
    model, weights, folder = opened.model, opened.weights, opened.folder
    source = f"the card of {req.model}" if req.model.startswith(SHIPPED_PREFIX) else None
    try:
        prep = resolve_preprocessing(model, folder, source=source, **req.preprocessing)
    except ValueError as e:
        raise TuneError(str(e)) from None
    ds = load_data(req.dataset, req.data_root, req.split, prep, req.max_images, num_outputs(model),
                   req.options.seed)
    loader = make_eval_loader(ds, req.options.batch_size)
    setup = {"model": req.model, "weights": weights, "data": f"{req.dataset}/{req.split}"
             + (f" ({req.data_root})" if req.data_root else ""), "images": len(ds),
             "preprocessing": prep.summary()}
    return tune(model, loader, req.methods, req.options, req.target_speedup, req.max_drop, progress, setup)


def write_outputs(result: TuneResult, req: TuneRequest) -> list[str]:
    """Write the CSV, JSON and plot asked for; the paths written."""
    done = []
    for path, write in ((req.csv_path, write_csv), (req.json_path, write_json), (req.plot_path, write_plot)):
        if path:
            write(result, path)
            done.append(path)
    return done


# --------------------------------------------------------------------------------------
# Output: table, CSV, JSON, plot
# --------------------------------------------------------------------------------------

CSV_FIELDS = ("method", "preset", "knob", "value", "gmacs", "gmac_reduction", "top1", "top1_se", "images",
              "images_per_s", "speedup", "pareto", "error")


def _f(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(result: TuneResult, console: Any = None) -> None:
    """The table sorted by measured speed-up (Pareto rows starred), then the chosen plan."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    s = result.setup
    table = Table(title=f"{s.get('model', 'model')} ({s.get('weights', '')}) on {s.get('data', 'data')}")
    for name in ("", "method", "MMACs", "MACs cut", "top-1", "± se", "img/s", "speed-up"):
        table.add_column(name, justify="left" if name in ("", "method") else "right")
    rows = sorted(result.rows, key=lambda r: (r.speedup is None, -(r.speedup or 0), -r.gmac_reduction))
    for r in rows:
        table.add_row("*" if r.pareto else "", r.method, f"{1000 * r.gmacs:.1f}", f"{r.gmac_reduction:.2f}x",
                      _f(r.top1, ".2f"), _f(r.top1_se, ".2f"), _f(r.images_per_s, ".0f"),
                      _f(r.speedup, ".2f") + ("x" if r.speedup is not None else ""))
    console.print(table)
    console.print(f"* Pareto-optimal (no other row is both faster and more accurate). top-1 on "
                  f"{s.get('images', '?')} images, ± one binomial standard error; images/s interleaved in "
                  f"this run ({s.get('device')}, {s.get('dtype')}, {s.get('backend')}, batch "
                  f"{s.get('timed_batch')}). Preprocessing: {s.get('preprocessing', '?')}", soft_wrap=True)
    for r in rows:
        if r.error:
            console.print(f"  {r.method}: not timed under {s.get('backend')}: {r.error}", soft_wrap=True)
    if result.interrupted:
        console.print("interrupted: the rows measured so far are shown and written")
    if result.chosen is not None:
        console.print(f"chosen ({result.rule}): {result.chosen.method}, top-1 {result.chosen.top1:.2f}, "
                      f"{result.chosen.speedup:.2f}x\n  Python: {result.chosen.python_line()}\n"
                      f"  CLI:    {result.chosen.cli_spec()}", soft_wrap=True)
    elif result.rule:
        console.print(f"no plan chosen: {result.rule}")


def write_csv(result: TuneResult, path: str) -> None:
    from .checkpoint import atomic_write_csv

    atomic_write_csv(path, CSV_FIELDS, ({k: v for k, v in asdict(r).items() if k in CSV_FIELDS}
                                        for r in result.rows))


def write_json(result: TuneResult, path: str) -> None:
    import json

    from .checkpoint import atomic_write
    from .options import json_safe

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(result.as_dict()), f, indent=2, default=str, allow_nan=False)

    atomic_write(path, write)


def write_plot(result: TuneResult, path: str) -> None:
    """Top-1 against measured speed-up, one curve per method, the unmodified model marked and the
    Pareto rows ringed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_savefig

    fig, ax = plt.subplots(figsize=(7, 5))
    done = [r for r in result.rows if r.top1 is not None and r.speedup is not None]
    for preset in dict.fromkeys(r.preset for r in done if r.preset != "none"):
        mine = sorted((r for r in done if r.preset == preset), key=lambda r: r.speedup)
        ax.errorbar([r.speedup for r in mine], [r.top1 for r in mine], yerr=[r.top1_se for r in mine],
                    marker="o", capsize=2, label=preset)
    for r in done:
        if r.preset == "none":
            ax.scatter([r.speedup], [r.top1], marker="*", s=160, color="black", zorder=3, label="unmodified")
            ax.axhline(r.top1, color="black", lw=0.6, ls=":")
    front = [r for r in done if r.pareto]
    ax.scatter([r.speedup for r in front], [r.top1 for r in front], s=150, facecolors="none",
               edgecolors="red", zorder=4, label="Pareto-optimal")
    if result.chosen is not None:
        ax.annotate(result.chosen.method, (result.chosen.speedup, result.chosen.top1), fontsize=7,
                    xytext=(5, -12), textcoords="offset points")
    s = result.setup
    ax.set_xlabel(f"measured speed-up vs unmodified ({s.get('device')}, {s.get('dtype')}, "
                  f"{s.get('backend')}, batch {s.get('timed_batch')})")
    ax.set_ylabel(f"top-1 (%) on {s.get('images', '?')} images")
    ax.set_title(f"{s.get('model', '')} on {s.get('data', '')}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)
