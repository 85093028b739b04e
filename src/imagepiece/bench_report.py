"""Output of ``imagepiece bench``: the tables, the busy-machine warning, JSON, CSV and the plot,
and the check of output paths that runs before any timing. Works on the result objects of
:mod:`imagepiece.bench` by their attributes (no import of it: arrows point down)."""

from __future__ import annotations

import json
import math
from typing import Any

from .options import json_safe

__all__ = ["NOISY_IQR", "render", "render_profile", "write_csv", "write_json", "write_plot"]

#: An img/s interquartile range wider than this share of the median is flagged as noisy.
NOISY_IQR = 0.10

_CSV_FIELDS = ["label", "plan", "knobs", "mode", "backend", "device", "dtype", "batch", "threads",
               "gmacs", "limit_gmacs", "final_tokens", "tokens_per_block", "ips_median", "ips_q1",
               "ips_q3", "ips_min", "ips_max", "speedup", "speedup_rounds", "speedup_best",
               "limit_ips_median", "limit_speedup", "efficiency", "efficiency_best",
               "ms_p50", "ms_p90", "ms_p99", "limit_ms_p50", "reduction_share", "speedup_ci_lo",
               "speedup_ci_hi", "efficiency_ci_lo", "efficiency_ci_hi", "reduction_share_ci_lo",
               "reduction_share_ci_hi", "prep_s",
               "peak_mem_mib", "error"]


# --------------------------------------------------------------------------------------
# Output paths, checked before any timing
# --------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------


def write_json(result: Any, path: str) -> None:
    from .checkpoint import atomic_write

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(result.as_dict()), f, indent=2, allow_nan=False)

    atomic_write(path, write)


def write_csv(result: Any, path: str) -> None:
    from .checkpoint import atomic_write_csv

    atomic_write_csv(path, _CSV_FIELDS, (_csv_row(v) for v in result.variants))


def _csv_row(v: Any) -> dict[str, Any]:
    d = v.as_dict()
    d["knobs"] = json.dumps(d["knobs"])
    d["tokens_per_block"] = " ".join(f"{a}>{b}" for a, b in v.tokens)
    for name in ("speedup", "efficiency", "reduction_share"):
        ci = d.get(f"{name}_ci")
        d[f"{name}_ci_lo"], d[f"{name}_ci_hi"] = (None, None) if ci is None else ci
    return {k: ("" if d.get(k) is None else d.get(k)) for k in _CSV_FIELDS}


def write_plot(result: Any, path: str) -> None:
    """Speed-up against GMACs per image (filled: measured; hollow: limit). Creates missing
    folders like the JSON and CSV writers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .checkpoint import atomic_savefig

    fig, ax = plt.subplots(figsize=(7, 5))
    for key, vs in _groups(result).items():
        vs = [v for v in vs if v.speedup is not None]
        if not vs:
            continue
        name = _group_title(key)
        pts = ax.scatter([v.gmacs for v in vs], [v.speedup for v in vs], label=name)
        lim = [v for v in vs if v.limit_speedup is not None]
        if lim:
            ax.scatter([v.limit_gmacs for v in lim], [v.limit_speedup for v in lim],
                       facecolors="none", edgecolors=pts.get_facecolor(), label=f"limit ({name})")
        for v in vs:
            ax.annotate(v.label, (v.gmacs, v.speedup), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.set_xlabel("GMACs per image (forward)")
    ax.set_ylabel("speed-up vs unmodified (ratio of medians)")
    weights = "random weights" if result.random_weights else result.weights
    ax.set_title(f"{result.config['model']} ({weights})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_savefig(fig, path)


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------


def _fmt(v: float | None, spec: str, suffix: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, spec) + suffix


def _with_ci(v: float | None, ci: Any, spec: str, suffix: str = "") -> str:
    """``value (lo, hi)``: a ratio and its paired 95% interval, where there is one."""
    if v is None or ci is None:
        return _fmt(v, spec, suffix)
    return f"{_fmt(v, spec, suffix)} ({_fmt(ci[0], spec)}, {_fmt(ci[1], spec)})"


def _groups(result: Any) -> dict[tuple, list]:
    groups: dict[tuple, list] = {}
    for v in result.variants:
        groups.setdefault(_group_key(v), []).append(v)
    return groups


def _group_key(v: Any) -> tuple:
    return (v.mode, v.backend, v.device, v.dtype, v.batch, v.threads)


def _group_title(key: tuple) -> str:
    mode, backend, device, dtype, batch, threads = key
    step = "training steps" if mode == "train" else "inference"
    return f"{step}, {backend}, {device} {dtype}, batch {batch}, {threads} threads"


def _header(result: Any, console: Any) -> None:
    m, c = result.machine, result.config
    console.print(f"[bold]imagepiece bench[/bold]  model {c['model']}  machine: {m['cpu']} "
                  f"({m['cpu_count']} logical CPUs){'  GPU: ' + m['gpu'] if 'gpu' in m else ''}")
    what = "training steps (forward, loss, backward, AdamW)" if c.get("mode") == "train" else "inference_mode"
    extra = ""
    if c.get("mode") == "train" and c.get("grad_checkpointing"):
        extra = ", gradient checkpointing"
    console.print(f"torch {m['torch']}  timm {m['timm']}  python {m['python']}  "
                  f"warm-up {c['warmup']}, {c['runs']} interleaved rounds (shuffled) x "
                  f"{c.get('calls', 1)} call(s), {what}{extra}, allocator {c.get('allocator', 'default')}")
    if result.random_weights:
        console.print("[yellow]weights: random (nothing can be downloaded here); speed and GMACs "
                      "do not depend on weights, token choices do.[/yellow]")
    else:
        console.print(f"weights: {result.weights}")


def _prep_title(backend: str) -> str | None:
    return {"compile": "compile s", "onnxruntime": "export s"}.get(backend)


def _table(title: str, cols: list[str], rows: list[list[str]], vs: list, backend: str):
    """A rich table of ``cols`` plus the preparation-time and failure columns when they apply."""
    from rich.table import Table

    prep = _prep_title(backend)
    t = Table(title=title)
    for col in cols + ([prep] if prep else []) + (["failed"] if any(v.error for v in vs) else []):
        t.add_column(col, justify="left" if col in ("variant", "failed") else "right",
                     no_wrap=col == "variant")
    for row, v in zip(rows, vs, strict=True):
        t.add_row(*_extra(row, v, vs, prep))
    return t


def _throughput_table(title: str, vs: list, backend: str):
    cols = ["variant", "GMACs", "tokens out", "img/s", "img/s IQR", "speed-up", "per-round", "best",
            "limit img/s", "limit x", "efficiency", "eff. best", "peak MiB"]
    rows = [[v.label, _gmacs(v.gmacs), str(v.final_tokens), _fmt(v.ips_median, ".1f"),
             _iqr(v), _with_ci(v.speedup, v.speedup_ci, ".2f", "x"), _fmt(v.speedup_rounds, ".2f", "x"),
             _fmt(v.speedup_best, ".2f", "x"), _fmt(v.limit_ips_median, ".1f"),
             _fmt(v.limit_speedup, ".2f"), _with_ci(v.efficiency, v.efficiency_ci, ".3f"),
             _fmt(v.efficiency_best, ".3f"), _fmt(v.peak_mem_mib, ".0f")] for v in vs]
    return _table(title, cols, rows, vs, backend)


def _latency_table(title: str, vs: list, backend: str):
    cols = ["variant", "GMACs", "tokens out", "p50 ms", "p90 ms", "p99 ms", "speed-up (p50)",
            "limit p50 ms", "reduction share", "peak MiB"]
    rows = [[v.label, _gmacs(v.gmacs), str(v.final_tokens), _fmt(v.ms_p50, ".2f"),
             _fmt(v.ms_p90, ".2f"), _fmt(v.ms_p99, ".2f"), _with_ci(v.speedup, v.speedup_ci, ".2f", "x"),
             _fmt(v.limit_ms_p50, ".2f"), _with_ci(v.reduction_share, v.reduction_share_ci, ".0%"),
             _fmt(v.peak_mem_mib, ".0f")] for v in vs]
    return _table(title, cols, rows, vs, backend)


def _gmacs(g: float) -> str:
    return f"{g:.2f}" if g >= 1 else f"{g:.4f}"


def _iqr(v: Any) -> str:
    return "n/a" if v.ips_q1 is None else f"{v.ips_q1:.1f}-{v.ips_q3:.1f}"


def _extra(row: list[str], v: Any, vs: list, prep: str | None) -> list[str]:
    if prep:
        row.append(_fmt(v.prep_s, ".1f"))
    if any(u.error for u in vs):
        row.append(v.error or "")
    return row


def _busy_warning(result: Any, console: Any) -> None:
    for b in getattr(result, "busy", []):
        if not b["busy"]:
            continue
        seen = "; ".join(b["reasons"])
        load = f"; load average {b['loadavg_before']} before, {b['loadavg_after']} after" \
            if b.get("loadavg_before") else ""
        console.print(f"[bold red]busy machine ({_group_title(tuple(b['group']))}): {seen}{load}. "
                      "The timings and their ratios are unreliable: rerun on an idle machine."
                      "[/bold red]")


def render(result: Any, console=None) -> None:
    """Print the header, one table per group, warnings and the per-block token counts."""
    from rich.console import Console

    if console is None:
        console = Console()
        if not console.is_terminal or console.width < 200:  # the widest table, unwrapped
            console = Console(width=200)
    _header(result, console)
    latency = bool(result.config.get("latency"))
    for key, vs in _groups(result).items():
        table = _latency_table if latency else _throughput_table
        console.print(table(_group_title(key), vs, key[1]))
    spread = max(((v.ips_q3 - v.ips_q1) / v.ips_median for v in result.variants
                  if v.ips_median), default=0.0)
    if spread > NOISY_IQR:
        console.print(f"[bold red]noisy timings: an img/s IQR reaches {spread:.0%} of its median "
                      "(other processes were competing for the CPU). Do not trust single timings; "
                      "a ratio is known only as well as its interval (paired over rounds, which "
                      "cancels a slow spell both sides shared); rerun on a quiet machine or with "
                      "more --runs.[/bold red]")
    _busy_warning(result, console)
    _tokens(result, console)
    _legend(result, console, latency)


def _tokens(result: Any, console: Any) -> None:
    console.print("tokens entering each block (prefix included), then leaving the last:")
    seen = set()
    for v in result.variants:
        if v.label not in seen:
            seen.add(v.label)
            console.print(f"  {v.label:<28} " + " ".join(str(a) for a, _ in v.tokens)
                          + f" -> {v.final_tokens}")


def _legend(result: Any, console: Any, latency: bool) -> None:
    if latency:
        console.print("p50/p90/p99 = percentiles of per-call milliseconds; speed-up = ratio of the "
                      "medians to the unmodified model; limit = same blocks on pre-cut sequences; "
                      "reduction share = 1 - limit p50 / variant p50, the share of a call spent "
                      "choosing, merging and tracking tokens (noise level: the unmodified model's "
                      "own row). (lo, hi): 95% interval, paired bootstrap over rounds.")
    else:
        console.print("speed-up = ratio of median img/s to the unmodified model; per-round = "
                      "median of per-round ratios; best = ratio of the best (least disturbed) "
                      "img/s; limit = same blocks on pre-cut sequences; efficiency = speed-up / "
                      "limit speed-up (medians; eff. best from best img/s). (lo, hi): 95% interval, "
                      "paired bootstrap over rounds.")
    console.print("GMACs: forward pass per image. Peak memory: CUDA only (n/a on CPU). compile s / "
                  "export s: preparation and first call, never timed. The baseline of each table "
                  "runs through the same backend and mode. On a shared CPU only ratios from one "
                  "run count.")


# --------------------------------------------------------------------------------------
# Profile (--profile)
# --------------------------------------------------------------------------------------


def render_profile(result: Any, console=None) -> None:
    """One table: a row per part of the forward pass, a column per plan, ``ms (ops)`` each
    (``ms`` on the wall clock), then the reduction, the total and the reduction's share."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=170)
    cfg = result.config
    wall = cfg.get("clock") == "wall"
    how = (f"wall-clock ms per forward pass, median of {cfg['runs']} passes, plans interleaved"
           if wall else f"ms per forward pass (ATen ops launched), mean of {cfg['runs']} profiled passes")
    table = Table(title=f"{cfg['model']}, batch {cfg['batch']}, {cfg['threads']} thread(s), CPU fp32 "
                        f"eager: {how}")
    labels = list(result.rows)
    table.add_column("part")
    for label in labels:
        table.add_column(label, justify="right")
    parts = [r.part for r in next(iter(result.rows.values()))]
    for i, part in enumerate(parts):
        table.add_row(part, *(_cell(result.rows[lb][i].ms, result.rows[lb][i].ops) for lb in labels))
    sums = {}
    for name, keep in (("reduction", lambda r: r.is_reduction), ("total", lambda r: True)):
        sums[name] = {lb: (sum(r.ms for r in result.rows[lb] if keep(r)),
                           None if wall else sum(r.ops for r in result.rows[lb] if keep(r)))
                      for lb in labels}
        table.add_row(name, *(_cell(*sums[name][lb]) for lb in labels), style="bold")
    table.add_row("reduction share", *(f"{sums['reduction'][lb][0] / sums['total'][lb][0]:.1%}"
                                       if sums["total"][lb][0] else "-" for lb in labels))
    console.print(table)
    console.print(
        "attention/mlp: the block's own compute where a block reduces (attention includes the "
        "proportional-attention bias inside SDPA); block: whole unreduced blocks; scores: class "
        "attention; bias: log sizes; matching: ToMe/ImagePiece matching; ranking: EViT top-k; "
        "state: gathers and scatters of tokens, sizes, positions and sources; step other: the "
        "metric (mean key) and size-normalised scores; reduction = scores + bias + matching + "
        "ranking + state + step other; share = reduction / total. "
        + ("Wall clock: timers around the parts, no profiler; each part's median over the "
           "passes (so the parts need not add up to the median total exactly)." if wall else
           "Profiler times include its own per-op cost: compare columns, not with "
           "`imagepiece bench` (--clock wall times the parts without the profiler)."))


def _cell(ms: float, ops: float | None) -> str:
    if ops is None:
        return f"{ms:.2f}" if ms else "-"
    return f"{ms:.2f} ({ops:.0f})" if ops or ms else "-"
