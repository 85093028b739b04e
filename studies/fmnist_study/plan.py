"""``--plan``: every step with its status and estimated minutes, per-stage totals and the pieces
of at most ``--max-minutes`` a session can run one after the other.

Estimates come from the configuration's cost model (``config.CostModel``) and each step's MACs
(counted with ``imagepiece.measure.count_gmacs``): a training run costs ``epochs x cost.train``
at the MACs it trains with (a fine-tune's keep-rate warm-up runs part of it at the baseline's
MACs), an evaluation or timing pass ``cost.forward`` per image. Once runs have finished, every
estimate is scaled by their measured/estimated ratio.
"""

from __future__ import annotations

from typing import Any

from .execute import epochs_done, train_values
from .pipeline import Step, Study
from .store import read_json, status


def train_estimate(study: Study, step: Step) -> float:
    run, cfg = step.run, study.cfg
    values = train_values(study.ctx, run)
    epochs = values["epochs"]
    base = study.mmacs(run, "none")
    if run.scratch and run.coherence != "stem":
        at_base = 1.0
    elif run.scratch:  # the package's warm-up: 10 and 100 of 300 epochs, scaled
        at_base = (round(epochs * 10 / 300) + 0.5 * round(epochs * 100 / 300)) / epochs
    else:
        at_base = (values["shrink_start"] + 0.5 * values["shrink_epochs"]) / epochs
    mmacs = at_base * base + (1 - at_base) * step.mmacs
    return epochs * cfg.cost.train(cfg.train_images, mmacs)


def raw_estimate(study: Study, step: Step) -> float:
    cost = study.cfg.cost
    if step.name.startswith("train:"):
        return train_estimate(study, step)
    if step.name.startswith("eval:"):
        return cost.forward(study.cfg.eval_images, step.mmacs)
    return cost.forward(step.images, step.mmacs)


def calibration(study: Study, steps: list[Step]) -> tuple[float, int]:
    """Measured / estimated minutes over the training runs finished in one go (1.0 when none)."""
    measured = estimated = 0.0
    count = 0
    for s in steps:
        found = read_json(s.path) if s.name.startswith("train:") else None
        if found and found.get("key") == s.key and not found.get("resumed_from"):
            measured += found.get("step_minutes", 0.0)
            estimated += raw_estimate(study, s)
            count += 1
    return (min(4.0, max(0.25, measured / estimated)) if count and estimated > 0 else 1.0), count


def estimator(study: Study, steps: list[Step]):
    factor, _ = calibration(study, steps)
    return lambda step: factor * raw_estimate(study, step)


def step_status(study: Study, step: Step) -> str:
    state = status(step.path, step.key)
    if state == "done":
        took = (read_json(step.path) or {}).get("step_minutes")
        return "done" + (f" ({took:.1f} min)" if took is not None else "")
    if step.run is not None and step.name.startswith("train:"):
        layout = study.ctx.layout
        done = max(epochs_done(layout.run_dir(step.run.name)), epochs_done(layout.partial(step.run.name)))
        if done:
            return f"partial ({done} epochs saved)"
    return state


def plan_lines(study: Study, piece_minutes: float) -> list[str]:
    steps = study.steps()
    factor, count = calibration(study, steps)
    est = estimator(study, steps)
    lines = [f"Study '{study.cfg.name}': {len(steps)} steps; cost model: {study.cfg.cost.note}"
             + (f"; scaled x{factor:.2f} from {count} finished run(s)" if count else ""), ""]
    lines.append(f"{'stage':<11} {'step':<70} {'est. min':>8}  status")
    totals: dict[str, list[float]] = {}
    todo: list[tuple[Step, float]] = []
    for s in steps:
        minutes, state = est(s), step_status(study, s)
        lines.append(f"{s.stage:<11} {s.name[:70]:<70} {minutes:8.1f}  {state}")
        totals.setdefault(s.stage, [0.0, 0.0])[0] += minutes
        if not state.startswith("done"):
            totals[s.stage][1] += minutes
            todo.append((s, minutes))
    lines += ["", f"{'stage':<11} {'all':>8} {'left':>8}"]
    lines += [f"{k:<11} {v[0]:8.1f} {v[1]:8.1f}" for k, v in totals.items()]
    whole, left = sum(v[0] for v in totals.values()), sum(v[1] for v in totals.values())
    lines += [f"{'total':<11} {whole:8.1f} {left:8.1f}   ({whole / 60:.1f} h in all, {left / 60:.1f} h left)",
              ""]
    return lines + pieces(todo, piece_minutes)


def pieces(todo: list[tuple[Step, float]], limit: float) -> list[str]:
    """Greedy split of the remaining steps into sessions of at most ``limit`` minutes."""
    out: list[dict[str, Any]] = []
    for step, minutes in todo:
        if not out or out[-1]["minutes"] + minutes > limit:
            out.append({"minutes": 0.0, "first": step.name, "last": step.name, "n": 0})
        out[-1].update(minutes=out[-1]["minutes"] + minutes, last=step.name, n=out[-1]["n"] + 1)
    lines = [f"Pieces of at most {limit:g} min (each: the same command with --max-minutes {limit:g}):"]
    lines += [f"  {i + 1}. {p['n']} steps, ~{p['minutes']:.0f} min: {p['first']} .. {p['last']}"
              for i, p in enumerate(out)]
    return lines if out else ["Nothing left to do."]
