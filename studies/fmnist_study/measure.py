"""Speed of every row, interleaved in one process, and the paper's analyses (Tables 4-7).

Speed follows docs/methods.md: inference mode, one random batch, every variant timed once per round in a
new random order (``imagepiece.measure.time_interleaved``) after warm-up rounds, glibc's allocator
kept steady, medians and per-round ratios to the baseline; the busy-machine monitor of
``imagepiece bench`` (``imagepiece.measure.BusyMonitor``) watches the rounds and its report is
stored with the numbers. Rows that share architecture and plan (an off-the-shelf EViT point and
its fine-tune) are timed separately: their difference is the noise floor of the run.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from imagepiece import analysis as A
from imagepiece.evaluate import first_images
from imagepiece.measure import machine_info, steady_allocator, time_interleaved

from .execute import Context, load_run_model, under
from .registry import Row, Run

try:  # added to imagepiece.bench by another change; the speed step runs without it
    from imagepiece.measure import BusyMonitor
except ImportError:  # pragma: no cover
    BusyMonitor = None  # type: ignore[assignment,misc]


def timed_rows(rows: list[Row], first_seed: int) -> list[Row]:
    """One row per trained model and plan: seed-0 rows of every kind but the tuning runs."""
    return [r for r in rows if r.kind != "tune" and r.seed == first_seed]


def _models(ctx: Context, runs: dict[str, Run], rows: list[Row]) -> dict[str, torch.nn.Module]:
    return {r.name: under(load_run_model(ctx, runs[r.run]), runs[r.run], r.spec).to(ctx.cfg.device)
            for r in rows}


def _stats(times: dict[str, list[float]], batch: int, base: str) -> dict[str, dict[str, float]]:
    out = {}
    for name, ts in times.items():
        ips = [batch / t for t in ts]
        q = statistics.quantiles(ips, n=4, method="inclusive") if len(ips) > 1 else [ips[0]] * 3
        out[name] = {"images_per_s": statistics.median(ips), "ips_q1": q[0], "ips_q3": q[2],
                     # per-round ratios cancel the slow spells of a shared machine that hit a round
                     "speedup": statistics.median(b / t for b, t in zip(times[base], ts, strict=True))}
    return out


def measure_speed(ctx: Context, runs: dict[str, Run], rows: list[Row], key: str) -> dict[str, Any]:
    cfg = ctx.cfg
    threads = torch.get_num_threads()
    if cfg.timing_threads:
        torch.set_num_threads(cfg.timing_threads)
    try:
        return _time_rows(ctx, runs, rows, key)
    finally:
        torch.set_num_threads(threads)  # the call's own threads again, for the steps after


def _time_rows(ctx: Context, runs: dict[str, Run], rows: list[Row], key: str) -> dict[str, Any]:
    cfg = ctx.cfg
    models = _models(ctx, runs, rows)
    x = torch.randn(cfg.bench_batch, 3, cfg.img_size, cfg.img_size, device=cfg.device)
    allocator = steady_allocator()
    monitor = BusyMonitor(torch.get_num_threads()) if BusyMonitor is not None else None
    if monitor is not None:
        monitor.start()
    times = time_interleaved(models, x, cfg.bench_warmup, cfg.bench_runs,
                             between=monitor.round if monitor is not None else None)
    busy = monitor.stop().as_dict() if monitor is not None else {"busy": None, "reasons": ["no monitor"]}
    return {"key": key, "variants": _stats(times, cfg.bench_batch, "scratch/baseline"),
            "machine": machine_info([cfg.device]), "threads": torch.get_num_threads(),
            "batch": cfg.bench_batch, "warmup": cfg.bench_warmup, "rounds": cfg.bench_runs,
            "allocator": allocator, "busy": busy}


# ------------------------------------------------------------------------------ analyses

# analysis -> (paper table, rows it runs on, imagepiece.analysis function)
ANALYSES: dict[str, tuple[str, tuple[str, ...], Callable[..., A.Result]]] = {
    "masking": ("Table 4", ("scratch/baseline", "fine-tuned/tome/k07/s0", "fine-tuned/evit/k07/s0",
                            "fine-tuned/imagepiece/k07/s0", "fine-tuned/tome/hyper/s0",
                            "fine-tuned/evit/hyper/s0", "fine-tuned/imagepiece/hyper/s0",
                            "control/evit+coherence/k07", "control/imagepiece-nocoherence/k07",
                            "control/imagepiece-stem/k07"), A.masking_robustness),
    "attentiveness": ("Table 5", ("fine-tuned/evit/k07/s0", "fine-tuned/imagepiece/k07/s0",
                                  "control/imagepiece-nocoherence/k07"), A.attentiveness_change),
    "similarity": ("Tables 6 and 8", ("fine-tuned/tome/k07/s0", "fine-tuned/imagepiece/k07/s0",
                                      "control/imagepiece-nocoherence/k07", "control/imagepiece-stem/k07"),
                   A.merged_similarity),
    "important": ("Table 7", ("off-the-shelf/tome/k07", "fine-tuned/tome/k07/s0",
                              "fine-tuned/imagepiece/k07/s0"), A.important_merged),
}


def analysis_images(ctx: Context, name: str) -> Any:
    count = ctx.cfg.mask_images if name == "masking" else ctx.cfg.analysis_images
    return first_images(ctx.dataset("test"), min(count, len(ctx.dataset("test"))))


def run_analysis(ctx: Context, name: str, runs: dict[str, Run], rows: dict[str, Row], key: str
                 ) -> dict[str, Any]:
    """One analysis over its rows (each row's own weights and plan); saves CSV/JSON/PNG beside."""
    table, wanted, fn = ANALYSES[name]
    ds = analysis_images(ctx, name)
    out_rows, metas = [], {}
    for label in wanted:
        row = rows[label]
        model = under(load_run_model(ctx, runs[row.run]), runs[row.run], row.spec).to(ctx.cfg.device)
        res = fn(model, ds, [row.spec], batch_size=ctx.cfg.eval_batch)
        out_rows += [{**r, "method": label, "spec": row.spec} for r in res.rows]
        metas[label] = res.meta
    columns = list(dict.fromkeys(["method", "spec"] + res.columns))
    result = A.Result(name, f"{res.title} (paper {table})", out_rows, {"per_row": metas}, columns)
    A.save_result(result, ctx.layout.file("analyses"))
    return {"key": key, "table": table, "rows": out_rows, "meta": metas}
