"""The report files of a (possibly partial) study, rewritten from the cache after every call:
``summary.json``, ``rows.csv``, ``curves.csv``, ``matched.csv``, ``claims.csv``, ``tuning.json``,
``tables.md`` (the markdown for docs/study.md) and the two curve plots."""

from __future__ import annotations

from typing import Any

from .figures import markdown, plot_curves
from .pipeline import Study, load_payloads, load_vectors, train_minutes
from .store import write_csv, write_json, write_text
from .summary import summarize


def gather(study: Study) -> dict[str, Any]:
    points, tuning, runs, rows = study.work()
    evals, speed, analyses = load_payloads(study)
    return summarize(study.cfg, [p.as_dict() for p in points], rows, evals, speed, analyses, tuning,
                     train_minutes(study, runs), load_vectors(study, evals))


def write_report(study: Study) -> dict[str, Any]:
    S = gather(study)
    f = study.ctx.layout.file
    write_json(f("summary.json"), {k: v for k, v in S.items() if k not in ("speed", "analyses", "vectors")})
    write_json(f("tuning.json"), S["tuning"])
    write_csv(f("rows.csv"), S["table"])
    write_csv(f("curves.csv"), S["curve"] + S["controls"])
    write_csv(f("matched.csv"), S["matched"])
    write_csv(f("claims.csv"), S["claims"])
    write_csv(f("scratch.csv"), S["scratch"])
    write_text(f("tables.md"), markdown(S))
    if S["curve"]:
        plot_to(f("curves_gmacs.png"), S, "gmacs")
    if S["speed"]:
        plot_to(f("curves_speed.png"), S, "speed")
    return S


def plot_to(path: str, S: dict[str, Any], axis: str) -> None:
    from imagepiece.checkpoint import atomic_write

    atomic_write(path, lambda tmp: plot_curves(S, tmp, axis))
