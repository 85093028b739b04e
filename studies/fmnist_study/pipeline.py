"""The study as a list of cached steps: what to do (``Study.steps``), the plan with cost estimates
(``--plan``), and running it in pieces (``Study.run``: skips finished steps, continues killed
training runs, stops before a step that would pass ``--max-minutes``, re-runs ``--only`` rows).
"""

from __future__ import annotations

import fnmatch
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import execute as E
from .config import StudyConfig
from .measure import ANALYSES, measure_speed, run_analysis, timed_rows
from .points import POINTS_VERSION, Point, choose_points, choose_stem_points, one_thread
from .registry import BASELINE, STAGES, Row, Run, Scratch, build
from .store import Layout, cached, key_of, read_json, status, write_json
from .summary import checks, decide_retune, decide_tuning


class StudyError(RuntimeError):
    """The study cannot go on as asked (a missing prerequisite, a failed check)."""


@dataclass
class Step:
    name: str  # "train:RUN", "eval:ROW", "speed", "analysis:NAME"
    stage: str
    path: str  # its cache file
    key: str
    what: str
    do: Callable[[bool], dict[str, Any]]  # fresh -> payload
    targets: tuple[str, ...]  # what --only patterns match
    needs: tuple[tuple[str, str], ...]  # (path, key) of steps it depends on
    run: Run | None = None
    mmacs: float = 0.0  # forward MMACs per image, for the estimate
    images: int = 0  # images passed forward (speed, analyses), for the estimate


class Study:
    def __init__(self, cfg: StudyConfig, data: str, out: str, runs: str, progress: bool = False,
                 log: Callable[[str], None] | None = None):
        self.cfg = cfg
        self.ctx = E.Context(cfg, Layout(out, runs), data, progress)
        self._points: dict[str, list[Point]] = {}
        self._mmacs: dict[tuple, float] = {}
        self._arch: dict[tuple, Any] = {}  # random-weight models for counting MACs
        self.t0 = time.time()
        self._log = log or print

    def log(self, text: str) -> None:
        line = f"[{(time.time() - self.t0) / 60:6.1f} min] {text}"
        self._log(line)
        os.makedirs(self.ctx.layout.out, exist_ok=True)
        with open(self.ctx.layout.file("log.txt"), "a") as f:
            f.write(line + "\n")

    # ------------------------------------------------------------------ what the study is

    def points(self, ip_knobs: dict[str, Any]) -> list[Point]:
        """Operating points (cached in points.json: counting GMACs takes seconds)."""
        key = key_of({"cfg": [self.cfg.model_kwargs, self.cfg.img_size, self.cfg.targets,
                              self.cfg.points_per_method, self.cfg.hyper], "ip": ip_knobs,
                      "search": POINTS_VERSION})
        return self._cached_points(key, "", ip_knobs, choose_points)

    def _cached_points(self, key: str, prefix: str, ip_knobs: dict[str, Any], choose) -> list[Point]:
        if key not in self._points:
            path = self.ctx.layout.file(f"points/{prefix}{key}.json")
            found = cached(path, key)
            pts = [Point(**p) for p in found["points"]] if found else choose(self.cfg, ip_knobs)
            if not found:
                write_json(path, {"key": key, "ip_knobs": ip_knobs, "points": [p.as_dict() for p in pts]})
            self._points[key] = pts
        return self._points[key]

    def tuning(self) -> dict[str, Any]:
        base = build(self.cfg, self.points({}), {})
        val = {r.name: ev["val_top1"] for r, ev in self._evals(*base).items()
               if r.kind == "tune" and "val_top1" in ev}
        return decide_tuning(self.cfg, val)

    def stem_points(self, ip_knobs: dict[str, Any]) -> list[Point]:
        """The from-scratch arms' operating points on the stem model (cached like ``points``)."""
        key = key_of({"cfg": [self.cfg.model_kwargs, self.cfg.img_size, self.cfg.hyper], "ip": ip_knobs,
                      "search": POINTS_VERSION, "model": "stem"})
        return self._cached_points(key, "stem-", ip_knobs, choose_stem_points)

    def retuning(self, points: list[Point], knobs: dict[str, Any]) -> dict[str, Any]:
        val = {r.name: ev["val_top1"] for r, ev in self._evals(*build(self.cfg, points, knobs)).items()
               if r.stage == "retune" and "val_top1" in ev}
        return decide_retune(self.cfg, val, knobs)

    def work(self) -> tuple[list[Point], dict[str, Any], list[Run], list[Row]]:
        """Points, tuning decisions (``tuning["retune"]``: the second round, which sets the
        from-scratch ImagePiece knobs), runs and rows."""
        tuning = self.tuning()
        points = self.points(tuning["knobs"])
        retune = self.retuning(points, tuning["knobs"])
        scratch = Scratch(tuple(self.stem_points(retune["knobs"])), retune["final"])
        runs, rows = build(self.cfg, points, tuning["knobs"], scratch)
        return points, dict(tuning, retune=retune), runs, rows

    def run_keys(self, runs: list[Run]) -> dict[str, str]:
        base = next(r for r in runs if r.name == BASELINE)
        base_key = E.train_key(self.ctx, base, None)
        return {r.name: E.train_key(self.ctx, r, base_key) for r in runs}

    def _evals(self, runs: list[Run], rows: list[Row]) -> dict[Row, dict[str, Any]]:
        keys = self.run_keys(runs)
        out = {}
        for r in rows:
            found = cached(E.eval_path(self.ctx, r.run, r.spec), E.eval_key(keys[r.run], r.spec))
            if found:
                out[r] = found
        return out

    # ------------------------------------------------------------------ steps

    def mmacs(self, run: Run, spec: str) -> float:
        """Forward MMACs per image of ``run``'s architecture under ``spec`` (random weights)."""
        k = (run.model, run.coherence, spec)
        if k not in self._mmacs:
            import torch

            from imagepiece.measure import count_gmacs

            x = torch.randn(1, 3, self.cfg.img_size, self.cfg.img_size)
            with one_thread():
                if k[:2] not in self._arch:
                    self._arch[k[:2]] = _architecture(self.cfg, run)
                model = E.under(self._arch[k[:2]], run, spec)
                self._mmacs[k] = 1000 * count_gmacs(model, x)
        return self._mmacs[k]

    def steps(self) -> list[Step]:
        points, tuning, runs, rows = self.work()
        keys = self.run_keys(runs)
        by_name = {r.name: r for r in runs}
        out: list[Step] = []
        seen: dict[str, Step] = {}
        for stage in STAGES:
            for run in (r for r in runs if r.stage == stage):
                out.append(self._train_step(run, keys, rows))
                out += self._eval_steps([r for r in rows if r.run == run.name and r.stage == stage], by_name,
                                        keys, seen)
            out += self._eval_steps([r for r in rows if r.stage == stage], by_name, keys, seen)
            if stage == "speed":  # the from-scratch arms are timed apart, once they are all trained
                timed = timed_rows(rows, self.cfg.seeds[0])
                scratch = [r for r in timed if r.kind == "from-scratch"]
                out.append(self._speed_step("speed", [r for r in timed if r not in scratch], by_name, keys))
                if scratch:
                    base = [r for r in timed if r.name == "scratch/baseline"]
                    out.append(self._speed_step("speed:scratch", base + scratch, by_name, keys))
            if stage == "analyses":
                out += [self._analysis_step(n, {r.name: r for r in rows}, by_name, keys) for n in ANALYSES]
        return out

    def _train_step(self, run: Run, keys: dict[str, str], rows: list[Row]) -> Step:
        layout = self.ctx.layout
        serves = tuple(r.name for r in rows if r.run == run.name and r.kind != "off-the-shelf")
        needs = () if run.scratch else ((layout.run_result(BASELINE), keys[BASELINE]),)
        return Step(f"train:{run.name}", run.stage, layout.run_result(run.name), keys[run.name],
                    f"{run.model.split('_')[0]} {run.method} seed {run.seed}"
                    + (f" coherence={run.coherence}" if run.coherence else ""),
                    lambda fresh: E.train_run(self.ctx, run, keys[run.name], fresh), (run.name,) + serves,
                    needs, run, self.mmacs(run, run.method))

    def _eval_steps(self, rows: list[Row], runs: dict[str, Run], keys: dict[str, str],
                    seen: dict[str, Step]) -> list[Step]:
        out = []
        for row in rows:
            path = E.eval_path(self.ctx, row.run, row.spec)
            if path in seen:  # one evaluation serves every row of the same weights and plan
                if row.name not in seen[path].targets:
                    seen[path].targets += (row.name,)
                continue
            run, key = runs[row.run], E.eval_key(keys[row.run], row.spec)
            step = Step(f"eval:{row.name}", row.stage, path, key, f"evaluate {row.run} under {row.spec}",
                        lambda fresh, run=run, spec=row.spec, key=key: E.evaluate(self.ctx, run, spec, key),
                        (row.name, row.run), ((self.ctx.layout.run_result(row.run), keys[row.run]),), run,
                        self.mmacs(run, row.spec))
            seen[path] = step
            out.append(step)
        return out

    def _speed_step(self, name: str, rows: list[Row], runs: dict[str, Run], keys: dict[str, str]) -> Step:
        cfg = self.cfg
        key = key_of({"rows": [(r.name, keys[r.run], r.spec) for r in rows],
                      "bench": [cfg.bench_batch, cfg.bench_warmup, cfg.bench_runs, cfg.timing_threads]})
        needs = tuple((self.ctx.layout.run_result(r.run), keys[r.run]) for r in rows)
        mm = sum(self.mmacs(runs[r.run], r.spec) for r in rows) / max(len(rows), 1)
        return Step(name, "speed", self.ctx.layout.file(f"{name.replace(':', '_')}.json"), key,
                    f"{len(rows)} variants interleaved, {cfg.bench_runs} rounds of batch {cfg.bench_batch}",
                    lambda fresh: measure_speed(self.ctx, runs, rows, key), (name,), needs, None, mm,
                    len(rows) * cfg.bench_batch * (cfg.bench_warmup + cfg.bench_runs))

    def _analysis_step(self, name: str, rows: dict[str, Row], runs: dict[str, Run], keys: dict[str, str]
                       ) -> Step:
        table, labels, _ = ANALYSES[name]
        used = [rows[lab] for lab in labels]
        key = key_of({"analysis": name, "rows": [(r.name, keys[r.run], r.spec) for r in used],
                      "images": self.cfg.mask_images if name == "masking" else self.cfg.analysis_images})
        needs = tuple((self.ctx.layout.run_result(r.run), keys[r.run]) for r in used)
        count = self.cfg.mask_images if name == "masking" else self.cfg.analysis_images
        return Step(f"analysis:{name}", "analyses", self.ctx.layout.file(f"analyses/{name}.step.json"), key,
                    f"{table} on {len(used)} rows",
                    lambda fresh: run_analysis(self.ctx, name, runs, rows, key), (f"analysis:{name}",), needs,
                    None, sum(self.mmacs(runs[r.run], r.spec) for r in used) / len(used),
                    len(used) * count * (7 if name == "masking" else 2))

    # ------------------------------------------------------------------ running

    def run(self, stages: list[str] | None = None, only: list[str] | None = None,
            max_minutes: float | None = None, fresh: bool = False, ignore_checks: bool = False,
            estimate: Callable[[Step], float] | None = None) -> str:
        """Do every unfinished selected step in order; returns "done", "stopped" or "gated"."""
        if self.cfg.threads:  # evaluation and timing too, not only training (which sets it itself)
            import torch

            torch.set_num_threads(self.cfg.threads)
        chosen = [s for s in STAGES if s != "report" and (not stages or s in stages)]
        ran: set[str] = set()
        for n in range(len(chosen)):
            # Earlier stages again too: the tuning decision can add rows to them (ImagePiece's
            # off-the-shelf points under the chosen knobs).
            for step in [s for s in self.steps() if s.stage in chosen[: n + 1] and s.path not in ran]:
                forced = bool(only) and matches(step, only)
                if (only and not forced) or (not (forced or fresh) and status(step.path, step.key) == "done"):
                    continue
                outcome = self._before(step, max_minutes, ignore_checks, estimate)
                if outcome:
                    return outcome
                # --only selects; only --fresh restarts a training run from nothing (a forced
                # unfinished run continues from its checkpoint, a finished one is read back).
                self._do(step, fresh)
                ran.add(step.path)
        if only and not ran:
            raise StudyError(f"no step matches {only}; names look like 'fine-tuned/evit/k07/s1', "
                             "'off-the-shelf/tome/hyper', 'control/evit+coherence/k07', 'baseline', "
                             "'speed', 'analysis:masking' (see --plan)")
        return "done"

    def _before(self, step: Step, max_minutes: float | None, ignore_checks: bool,
                estimate: Callable[[Step], float] | None) -> str | None:
        failed = [] if ignore_checks else self.failed_checks(step.stage)
        if failed:
            self.log("stopping: check(s) failed: " + "; ".join(failed) + ". Change the configuration "
                     "(e.g. more epochs) or pass --ignore-checks.")
            return "gated"
        minutes = estimate(step) if estimate else 0.0
        if max_minutes is not None and (time.time() - self.t0) / 60 + minutes > max_minutes:
            self.log(f"stopping before {step.name} (about {minutes:.0f} min) to stay within --max-minutes "
                     f"{max_minutes:g}; run the same command again to continue")
            return "stopped"
        missing = [p for p, k in step.needs if status(p, k) != "done"]
        if missing:
            raise StudyError(f"{step.name} needs {', '.join(missing)}: run the earlier stages first")
        return None

    def _do(self, step: Step, fresh: bool) -> None:
        self.log(f"{step.name}: {step.what}")
        t = time.time()
        payload = step.do(fresh)
        payload["step_minutes"] = (time.time() - t) / 60
        write_json(step.path, payload)
        top = payload.get("val_top1")
        self.log(f"  done in {payload['step_minutes']:.1f} min" + (f", val top-1 {top:.2f}" if top else ""))

    def save_partial(self) -> list[tuple[str, int]]:
        """(run, epochs) of every unfinished training run copied into the results."""
        out = []
        for step in self.steps():
            if step.name.startswith("train:") and status(step.path, step.key) != "done":
                epochs = E.save_partial(self.ctx, step.run.name)
                if epochs:
                    out.append((step.run.name, epochs))
        return out

    def failed_checks(self, stage: str) -> list[str]:
        """Checks that must pass before ``stage``: the baseline's before any fine-tune, EViT's
        keep-0.7 gap before anything after the ``checks`` stage."""
        order = STAGES.index(stage)
        if order <= STAGES.index("offtheshelf"):
            return []
        _, _, runs, rows = self.work()
        val = {r.name: ev["val_top1"] for r, ev in self._evals(runs, rows).items() if "val_top1" in ev}
        found = checks(self.cfg, val)
        wanted = found[:1] if order <= STAGES.index("checks") else found
        return [f"{c[0]} = {c[1]} (want {c[2]})" for c in wanted if c[3] == "FAILED"]  # accepted ones aside


def matches(step: Step, patterns: list[str]) -> bool:
    """Whether a --only pattern names the step, its run or one of the rows it serves."""
    return any(fnmatch.fnmatchcase(t, p) for t in step.targets + (step.name,) for p in patterns)


def _architecture(cfg: StudyConfig, run: Run) -> Any:
    import timm

    kwargs = dict(cfg.model_kwargs, img_size=cfg.img_size, num_classes=10)
    if run.coherence:
        kwargs["coherence"] = run.coherence
    if run.model.startswith("imagepiece_"):
        kwargs["plan"] = "none"
    return timm.create_model(run.model, **kwargs).eval()


def load_payloads(study: Study) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    """(evaluations by row name, speed, analyses by name) from the cache, current keys only."""
    points, tuning, runs, rows = study.work()
    by_name = {r.name: r for r in runs}
    evals = {r.name: dict(ev, command=E.eval_command(study.ctx, by_name[r.run], r.spec))
             for r, ev in study._evals(runs, rows).items()}
    steps = {s.name: s for s in study.steps() if s.name.startswith(("speed", "analysis:"))}
    speed = cached(steps["speed"].path, steps["speed"].key)
    step = steps.get("speed:scratch")
    scratch = cached(step.path, step.key) if step else None
    if speed and scratch:  # the from-scratch arms' speed-ups, timed in their own run
        speed = dict(speed, variants={**scratch["variants"], **speed["variants"]})
    analyses = {n: cached(steps[f"analysis:{n}"].path, steps[f"analysis:{n}"].key) for n in ANALYSES}
    return evals, speed, {k: v for k, v in analyses.items() if v}


def load_vectors(study: Study, evals: dict[str, Any]) -> dict[str, Any]:
    """Per-image test correctness of every evaluated row (computed once, then cached), for the
    paired comparisons."""
    _, _, runs, rows = study.work()
    keys, by_name = study.run_keys(runs), {r.name: r for r in runs}
    out = {}
    for row in rows:
        ev = evals.get(row.name)
        if ev is not None and "test_top1" in ev:
            key = E.eval_key(keys[row.run], row.spec)
            out[row.name] = E.correct(study.ctx, by_name[row.run], row.spec, key, ev["test_top1"])
    return out


def train_minutes(study: Study, runs: list[Run]) -> float:
    total = 0.0
    for r in runs:
        found = read_json(study.ctx.layout.run_result(r.name))
        total += (found or {}).get("train_minutes", 0.0)
    return total
