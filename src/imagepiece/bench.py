"""Speed benchmark that users can trust (docs/methods.md, Measurement protocol).

Every variant (the unmodified model, each reduction plan and each plan's *limit*) is measured in
one process, interleaved round-robin: every round runs every variant once on the same input
tensor, in ``torch.inference_mode()`` (or, with ``mode="train"``, as a full training step),
synchronising CUDA around each timed call. Results are medians with their spread and ratios to
the unmodified model, both as a ratio of medians and as the median of per-round ratios (robust
to a shared, noisy machine); ``latency=True`` reports per-call milliseconds (p50/p90/p99).
Each backend (eager, ``torch.compile``, ONNX Runtime) is its own group with its own baseline.

Modules, arrows pointing down: this one validates a request, builds the variants and runs the
groups; :mod:`imagepiece.measure` holds the instruments (interleaved timing, the limit, GMACs,
busy-machine detection, the backends that make a variant's timed callable);
:mod:`.bench_report` prints and writes the results.

The **limit** of a plan runs the same blocks (same weights) on sequences that are already cut
to the plan's token counts, with no selection work: attention (fused SDPA) on ``tokens_in``
tokens, residual, slice to ``tokens_out`` tokens, MLP. No implementation of the plan can be
faster, so ``efficiency = speed-up / limit speed-up`` says how much the selection work costs.

GMACs are counted from the ops that actually run (``torch.utils.flop_counter``, FLOPs / 2,
per image). Peak memory is CUDA's ``max_memory_allocated`` during one forward pass, above what
was allocated before it; on CPU it is reported as n/a, because PyTorch's CPU allocator keeps no
peak statistics and a process per variant (to read its RSS) would break the interleaving.

By default the glibc allocator is made to keep freed memory (:func:`steady_allocator`):
otherwise large activation buffers are returned to the OS and page-faulted back in, at a cost
that depends on which variant ran before and biased the unmodified model by up to 10%. The
round order is shuffled, and a run whose img/s spread is wide is flagged as noisy.

Library use::

    from imagepiece.bench import BenchConfig, run_benchmark
    result = run_benchmark(BenchConfig(methods=["none", "evit:keep_rate=0.5"], runs=5))
    print(result.variants[1].speedup)
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .bench_report import NOISY_IQR, render, write_csv, write_json, write_plot
from .distributed import DeviceError, resolve_device
from .loading import ModelLoadError, open_model
from .measure import (
    BACKENDS,
    DTYPES,
    MODES,
    BusyMonitor,
    LimitViT,
    build,
    check_dtype,
    count_gmacs,
    inference_context,
    machine_info,
    paired_ratio_interval,
    peak_memory,
    quantiles,
    steady_allocator,
    time_interleaved,
)
from .measure.profile import CLOCKS, ProfileRow, profile_forward, wall_forward_parts
from .patch import describe, patch, set_grad_checkpointing
from .plan import PRESETS, MethodError, format_method, knob_names, make_plan, parse_method

__all__ = [
    "BACKENDS",
    "DEFAULT_METHODS",
    "MODES",
    "NOISY_IQR",
    "HYPER_SPEED",
    "BenchConfig",
    "BenchError",
    "BenchResult",
    "VariantResult",
    "ProfileResult",
    "render",
    "run_benchmark",
    "run_profile",
    "write_csv",
    "write_json",
    "write_plot",
]

#: The hyper-speed presets, at matched compute on DeiT-S 224 (1.67 / 1.72 / 1.72 GMACs against
#: 4.60 unmodified): ToMe r=(18, -0.5), EViT keep 0.25, ImagePiece keep 0.34.
HYPER_SPEED = ("tome-hyper", "evit-hyper", "imagepiece-hyper")

#: The unmodified model, ToMe r=13, EViT keep 0.7, ImagePiece keep 0.7 and the hyper presets.
DEFAULT_METHODS = ("none", "tome", "evit", "imagepiece", *HYPER_SPEED)



class BenchError(ValueError):
    """An invalid benchmark request; raised before any timing starts."""


@dataclass
class BenchConfig:
    """What to measure. Lists are sweeps: every combination of device, dtype, batch size and
    thread count is one group with its own interleaved measurement and its own baseline."""

    model: str = "deit_small_patch16_224"
    methods: Sequence[str] = DEFAULT_METHODS
    keep_rates: Sequence[float] = ()  # sweep: applied to methods with a keep_rate knob
    rs: Sequence[int] = ()  # sweep: applied to methods with an r knob
    batch_sizes: Sequence[int] | None = None  # None: 1 with latency, else 32
    threads: Sequence[int] = ()  # () = torch's current setting
    devices: Sequence[str] = ("cpu",)
    dtypes: Sequence[str] = ("fp32",)
    warmup: int = 2
    runs: int = 10
    pretrained: bool = False
    checkpoint: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    limit: bool = True
    seed: int = 0
    #: "steady": keep freed memory in the process (glibc: no mmap for big blocks, no trimming),
    #: so that no variant pays page faults for buffers the previous variant gave back to the OS;
    #: "default": leave the allocator alone. See :func:`steady_allocator`.
    allocator: str = "steady"
    #: "inference" times a forward pass; "train" a full training step (forward, cross-entropy,
    #: backward, AdamW step) with each variant's own copy of the weights and optimizer.
    mode: str = "inference"
    #: Report per-call milliseconds (p50/p90/p99) and the reduction share instead of img/s.
    latency: bool = False
    #: Timed calls per variant per round (None: 10 with latency, else 1).
    calls: int | None = None
    #: Each is a group with its own baseline through the same backend: eager, compile
    #: (torch.compile), onnxruntime (ONNX export, CPU provider; inference, CPU, fp32 only).
    backends: Sequence[str] = ("eager",)
    compile_backend: str = "inductor"  # torch.compile's backend ("aot_eager" in fast tests)
    #: Mixed precision: autocast fp16 on CUDA (with a GradScaler in training), bf16 on CPU.
    amp: bool = False
    grad_checkpointing: bool = False  # training mode: the family's gradient checkpointing
    #: Sample other processes' CPU use and time a calibration kernel around the rounds.
    busy_check: bool = True
    #: ``run_profile`` only: "profiler" (torch.profiler, times and ATen op counts) or "wall"
    #: (wall-clock timers around the same parts, plans interleaved; times only).
    clock: str = "profiler"


@dataclass
class VariantResult:
    """One variant of one group. Speeds are images per second; times are seconds per batch."""

    label: str
    plan: str
    knobs: dict[str, Any]
    device: str
    dtype: str
    batch: int
    threads: int
    gmacs: float  # forward pass, per image
    tokens: list[tuple[int, int]]  # (entering, leaving) each block, prefix tokens included
    times: list[float]
    # None below: the variant failed under its backend (see ``error``) or the baseline did
    ips_median: float | None
    ips_q1: float | None
    ips_q3: float | None
    ips_min: float | None
    ips_max: float | None
    speedup: float | None  # ratio of medians to the unmodified model
    speedup_rounds: float | None  # median of per-round ratios
    speedup_best: float | None  # ratio of best (least disturbed) img/s: robust when a CPU is shared
    limit_gmacs: float | None = None
    limit_times: list[float] | None = None
    limit_ips_median: float | None = None
    limit_speedup: float | None = None
    efficiency: float | None = None  # speedup / limit_speedup
    efficiency_best: float | None = None  # from best img/s of the plan and of its limit
    peak_mem_mib: float | None = None  # CUDA only
    mode: str = "inference"
    backend: str = "eager"
    ms_p50: float | None = None  # per-call milliseconds
    ms_p90: float | None = None
    ms_p99: float | None = None
    limit_ms_p50: float | None = None
    #: 1 - limit median / variant median: share of the time spent beyond the plan's limit
    #: (choosing, merging, tracking tokens).
    reduction_share: float | None = None
    #: 95% intervals (paired bootstrap over rounds, :func:`paired_ratio_interval`) of the
    #: speed-up, the efficiency and the reduction share; None with fewer than 3 rounds.
    speedup_ci: tuple[float, float] | None = None
    efficiency_ci: tuple[float, float] | None = None
    reduction_share_ci: tuple[float, float] | None = None
    prep_s: float | None = None  # compile or export, plus the first call; never timed
    error: str | None = None  # why the variant could not run under its backend

    @property
    def final_tokens(self) -> int:
        return self.tokens[-1][1] if self.tokens else 0

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["tokens"] = [list(t) for t in self.tokens]
        d["final_tokens"] = self.final_tokens
        return d


@dataclass
class BenchResult:
    config: dict[str, Any]
    machine: dict[str, Any]
    random_weights: bool
    weights: str
    variants: list[VariantResult]
    #: One record per group: ``group`` (mode, backend, device, dtype, batch, threads), ``busy``,
    #: ``reasons`` and the readings (see :mod:`imagepiece.measure.busy`).
    busy: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "machine": self.machine,
                "random_weights": self.random_weights, "weights": self.weights,
                "variants": [v.as_dict() for v in self.variants], "busy": self.busy}


# --------------------------------------------------------------------------------------
# Method specs: "name" or "name:knob=value,knob=value"; list values separated by ";"
# --------------------------------------------------------------------------------------


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    """:func:`imagepiece.plan.parse_method`, raising :class:`BenchError` for a bad spec."""
    try:
        return parse_method(spec)
    except MethodError as e:
        raise BenchError(str(e)) from None


def _expand_methods(config: BenchConfig, depth: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, preset, knobs) for every variant; the unmodified model is always first."""
    out: list[tuple[str, str, dict[str, Any]]] = [("none", "none", {})]
    seen = {"none"}
    for spec in config.methods:
        name, knobs = _parse(spec)
        names = set(knob_names(name))
        variants = [knobs]
        if config.keep_rates and "keep_rate" in names and "keep_rate" not in knobs:
            variants = [{**v, "keep_rate": kr} for v in variants for kr in config.keep_rates]
        if config.rs and "r" in names and "r" not in knobs:
            variants = [{**v, "r": r} for v in variants for r in config.rs]
        for kn in variants:
            try:
                plan = make_plan(name, depth, **kn)
            except (TypeError, ValueError) as e:
                allowed = ", ".join(sorted(names - {"fuse"})) or "none"
                raise BenchError(f"invalid method {format_method(name, kn)!r}: {e} (knobs of {name!r}: "
                                 f"{allowed})") from None
            label = "none" if plan.is_identity and not kn and name == "none" else format_method(name, kn)
            if label in seen:
                continue
            seen.add(label)
            out.append((label, name, kn))
    return out


# --------------------------------------------------------------------------------------
# Validation and set-up
# --------------------------------------------------------------------------------------


def _check_positive(name: str, values: Sequence[int], low: int = 1) -> list[int]:
    values = list(values)
    if not values:
        raise BenchError(f"{name} needs at least one value")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise BenchError(f"{name}={v!r} is not allowed; expected an integer >= {low}")
    return values


def _check_device(device: str) -> str:
    """:func:`imagepiece.distributed.check_device`, with ``auto`` resolved (the device is part
    of each group's label), raising :class:`BenchError`."""
    try:
        return str(resolve_device(device, "device"))
    except DeviceError as e:
        raise BenchError(str(e)) from None


def _check_dtype(dtype: str) -> str:
    try:
        return check_dtype(dtype)
    except ValueError as e:
        raise BenchError(str(e)) from None


def _create_model(config: BenchConfig) -> tuple[nn.Module, str]:
    """The unreduced model of ``config`` and its weights in words (see :func:`open_model`)."""
    try:
        opened = open_model(config.model, config.checkpoint, config.pretrained, config.model_kwargs,
                            seed=config.seed)
    except ModelLoadError as e:
        raise BenchError(str(e)) from None
    return opened.model, opened.weights


# --------------------------------------------------------------------------------------
# Validation of a whole request
# --------------------------------------------------------------------------------------


@dataclass
class _Request:
    """A validated request: the resolved sweeps."""

    batches: list[int]
    threads: list[int]
    devices: list[str]
    dtypes: list[str]
    backends: list[str]
    calls: int

    def groups(self, mode: str, amp: bool) -> list[tuple[str, str, str, str, int, int]]:
        """(mode, backend, device, dtype, batch, threads) of every group, in order."""
        out = []
        for backend in self.backends:
            for device in self.devices:
                dtypes = [("fp16" if device.startswith("cuda") else "bf16")] if amp else self.dtypes
                out += [(mode, backend, device, dt, b, th) for dt in dtypes for b in self.batches
                        for th in self.threads]
        return out


def _validate(config: BenchConfig) -> _Request:
    """Every check that does not need the model; raises :class:`BenchError`."""
    if config.mode not in MODES:
        raise BenchError(f"mode={config.mode!r} is not allowed; allowed: {', '.join(MODES)}")
    default_batch = [1] if config.latency else [32]
    batches = _check_positive("batch size", default_batch if config.batch_sizes is None
                              else config.batch_sizes)
    _check_positive("runs", [config.runs])
    _check_positive("warmup", [config.warmup], low=0)
    calls = 10 if config.latency else 1
    if config.calls is not None:
        calls = _check_positive("calls", [config.calls])[0]
    threads = _check_positive("threads", config.threads) if config.threads else [
        torch.get_num_threads()]
    devices = [_check_device(d) for d in (config.devices or ["cpu"])]
    dtypes = [_check_dtype(d) for d in (config.dtypes or ["fp32"])]
    if config.amp and dtypes != ["fp32"]:
        raise BenchError(f"amp=True picks the dtype itself (fp16 on CUDA, bf16 on CPU); with dtype "
                         f"{', '.join(dtypes)} give one or the other")
    if config.grad_checkpointing and config.mode != "train":
        raise BenchError("grad_checkpointing only applies to mode 'train' (training steps)")
    backends = _check_backends(config, devices, dtypes)
    for kr in config.keep_rates:
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0 < kr <= 1:
            raise BenchError(f"keep rate {kr!r} is outside (0, 1]; expected 0 < keep_rate <= 1")
    _check_positive("r", config.rs, low=0) if config.rs else None
    if config.allocator not in ("steady", "default"):
        raise BenchError(f"allocator={config.allocator!r}; allowed: steady, default")
    if not config.methods:
        raise BenchError(f"no methods given; allowed: {', '.join(PRESETS)}")
    # syntax, preset names and sweeps before the (slow) model creation
    _check_sweeps(config, [_parse(spec) for spec in config.methods])
    return _Request(batches, threads, devices, dtypes, backends, calls)


def _check_sweeps(config: BenchConfig, methods: list[tuple[str, dict[str, Any]]]) -> None:
    """A keep-rate or r sweep must apply to at least one method (one with that knob, not fixed
    in its spec): otherwise it would be ignored without a word."""
    for option, knob, values in (("--keep-rate", "keep_rate", config.keep_rates), ("--r", "r", config.rs)):
        if values and not any(knob in knob_names(name) and knob not in knobs for name, knobs in methods):
            takers = ", ".join(n for n in PRESETS if knob in knob_names(n))
            given = ", ".join(repr(s) for s in config.methods)
            raise BenchError(f"{option} {', '.join(map(str, values))} applies to no method given "
                             f"({given}): {knob} is a knob of {takers} (and is not swept where the "
                             "spec fixes it)")


def _check_backends(config: BenchConfig, devices: list[str], dtypes: list[str]) -> list[str]:
    backends = list(dict.fromkeys(str(b).strip().lower() for b in (config.backends or ["eager"])))
    for b in backends:
        if b not in BACKENDS:
            raise BenchError(f"unknown backend {b!r}; allowed: {', '.join(BACKENDS)}")
    if "onnxruntime" in backends:
        why = ("training steps" if config.mode == "train" else
               f"device {', '.join(devices)}" if devices != ["cpu"] else
               "amp" if config.amp else f"dtype {', '.join(dtypes)}" if dtypes != ["fp32"] else None)
        if why:
            raise BenchError(f"backend 'onnxruntime' runs inference on the CPU in fp32 only, not "
                             f"{why}; allowed there: eager, compile")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            raise BenchError("backend 'onnxruntime' needs the onnxruntime package "
                             "(pip install onnxruntime)") from None
    if "compile" in backends:
        import torch._dynamo

        known = torch._dynamo.list_backends(exclude_tags=())
        if config.compile_backend not in known:
            raise BenchError(f"unknown torch.compile backend {config.compile_backend!r}; allowed: "
                             f"{', '.join(known)}")
    return backends


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


@dataclass
class _Setup:
    """The variants of one request, built once: models, token counts, limits, GMACs."""

    methods: list[tuple[str, str, dict[str, Any]]]
    models: dict[str, nn.Module]
    tokens: dict[str, list[tuple[int, int]]]
    limits: dict[tuple, nn.Module]
    gmacs: dict[str, float]
    limit_gmacs: dict[tuple, float]
    image: tuple[int, ...]  # (channels, height, width)


def _setup(config: BenchConfig, base: nn.Module, gen: torch.Generator) -> _Setup:
    try:
        info = describe(base)
    except TypeError as e:
        raise BenchError(f"model {config.model!r}: {e}") from None
    methods = _expand_methods(config, info.depth)
    image = (info.in_chans, *info.image_size)
    models: dict[str, nn.Module] = {}
    for label, name, knobs in methods:
        if label == "none":
            models[label] = base
            continue
        try:
            models[label] = patch(copy.deepcopy(base), name, **knobs)
        except (TypeError, ValueError) as e:
            raise BenchError(f"cannot apply {label!r} to {config.model!r}: {e}") from None
    num_tokens = info.num_tokens
    tokens = {label: ([(num_tokens, num_tokens)] * info.depth if label == "none" else
                      models[label].imagepiece.token_counts(num_tokens)) for label in models}
    limits: dict[tuple, nn.Module] = {}
    if config.limit:
        for label in models:
            limits.setdefault(tuple(tokens[label]), LimitViT(base, tokens[label]))
    flop_x = torch.randn(1, *image, generator=gen)
    gmacs = {label: count_gmacs(m, flop_x) for label, m in models.items()}
    limit_gmacs = {key: count_gmacs(m, flop_x) for key, m in limits.items()}
    return _Setup(methods, models, tokens, limits, gmacs, limit_gmacs, image)


def run_benchmark(
    config: BenchConfig,
    progress: Callable[[int, int, str], None] | None = None,
) -> BenchResult:
    """Validate ``config`` (raising :class:`BenchError` before any timing), then measure.

    ``progress(done, total, what)`` is called after each variant's turn in a round, and with
    ``done`` unchanged before each variant is prepared (compiled or exported).
    """
    req = _validate(config)
    base, weights = _create_model(config)
    gen = torch.Generator().manual_seed(config.seed)
    setup = _setup(config, base, gen)
    groups = req.groups(config.mode, config.amp)
    n_fns = len(setup.models) + len(setup.limits)
    ticker = _Ticker(progress, len(groups) * n_fns * (config.warmup + config.runs))
    results: list[VariantResult] = []
    busy: list[dict[str, Any]] = []
    old_threads = torch.get_num_threads()
    rng = random.Random(config.seed)
    allocator = steady_allocator() if config.allocator == "steady" else "default"
    try:
        for group in groups:
            variants, report = _measure_group(config, setup, group, req.calls, rng, gen, ticker)
            results += variants
            if report is not None:
                busy.append({"group": list(group), **report.as_dict()})
    finally:
        torch.set_num_threads(old_threads)
        for m in setup.models.values():
            m.to("cpu")

    cfg = dataclasses.asdict(config)
    cfg.update(allocator=allocator, methods=list(config.methods), batch_sizes=req.batches,
               threads=req.threads, devices=req.devices, dtypes=req.dtypes, backends=req.backends,
               calls=req.calls, keep_rates=list(config.keep_rates), rs=list(config.rs))
    return BenchResult(cfg, machine_info(req.devices), weights == "random", weights, results, busy)


class _Ticker:
    def __init__(self, progress: Callable[[int, int, str], None] | None, total: int):
        self.progress, self.total, self.done = progress, total, 0

    def __call__(self, what: str, advance: int = 1) -> None:
        self.done += advance
        if self.progress is not None:
            self.progress(self.done, self.total, what)


def _group_modules(config: BenchConfig, setup: _Setup, device: str) -> dict[tuple, nn.Module]:
    """("v", label) and ("l", tokens) -> module on ``device``. Training gets fresh copies: each
    variant and each limit trains its own weights with its own optimizer."""
    mods: dict[tuple, nn.Module] = {("v", label): m for label, m in setup.models.items()}
    mods.update({("l", key): m for key, m in setup.limits.items()})
    if config.mode == "train":
        mods = {k: copy.deepcopy(m) for k, m in mods.items()}
        if config.grad_checkpointing:
            for m in mods.values():
                set_grad_checkpointing(m, True)
    return {k: m.to(device) for k, m in mods.items()}


def _measure_group(config: BenchConfig, setup: _Setup, group: tuple, calls: int,
                   rng: random.Random, gen: torch.Generator, ticker: _Ticker):
    mode, backend, device, dtype, batch, nthreads = group
    torch.set_num_threads(nthreads)
    modules = _group_modules(config, setup, device)
    x = torch.randn(batch, *setup.image, generator=gen).to(device)
    dt = DTYPES[dtype]

    def autocast():
        return torch.autocast(device.split(":")[0], dtype=dt, enabled=dt != torch.float32)

    def ctx():
        return contextlib.nullcontext() if mode == "train" else inference_context(autocast)

    fns, prep, errors = {}, {}, {}
    where = f"{mode} {backend} {device} {dtype} b{batch} t{nthreads}"
    for key, module in modules.items():
        ticker(f"{where}: preparing {key[1] if key[0] == 'v' else 'a limit'}", advance=0)
        fn, prep[key], err = build(module, backend, mode, x, nthreads, autocast, dt,
                                   config.compile_backend)
        if fn is None:
            errors[key] = err
        else:
            fns[key] = fn
    monitor = BusyMonitor(nthreads) if config.busy_check else None
    if monitor is not None:
        monitor.start()
    with autocast() if mode == "inference" else contextlib.nullcontext():
        times = time_interleaved(
            fns, x, config.warmup, config.runs, rng,
            lambda key: ticker(f"{where}: {key[1] if key[0] == 'v' else 'limit'}"),
            inference=mode == "inference", repeat=calls,
            between=monitor.round if monitor is not None else None)
    report = monitor.stop() if monitor is not None else None
    peaks = {k: peak_memory(fn, x, device, ctx) for k, fn in fns.items() if k[0] == "v"}
    return _summarise(setup, group, times, prep, errors, peaks, calls), report


def _speeds(t: list[float] | None, base_t: list[float] | None, batch: int) -> dict[str, Any]:
    """img/s statistics, per-call ms percentiles and ratios to the baseline's times."""
    keys = ("ips_median", "ips_q1", "ips_q3", "ips_min", "ips_max", "speedup", "speedup_rounds",
            "speedup_best", "ms_p50", "ms_p90", "ms_p99")
    out: dict[str, Any] = dict.fromkeys(keys)
    if not t:
        return out
    ips = [batch / s for s in t]
    q1, q3 = quantiles(ips)
    ms = sorted(s * 1e3 for s in t)
    pct = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    out.update(ips_median=statistics.median(ips), ips_q1=q1, ips_q3=q3, ips_min=min(ips),
               ips_max=max(ips), ms_p50=pct[49], ms_p90=pct[89], ms_p99=pct[98])
    if base_t:
        out.update(speedup=out["ips_median"] / statistics.median(batch / s for s in base_t),
                   speedup_rounds=statistics.median(b / s for b, s in zip(base_t, t, strict=True)),
                   speedup_best=min(base_t) / min(t))
    return out


def _summarise(setup: _Setup, group: tuple, times: dict, prep: dict, errors: dict,
               peaks: dict, calls: int) -> list[VariantResult]:
    mode, backend, device, dtype, batch, nthreads = group
    base_t = times.get(("v", "none"))
    out = []
    for label, name, knobs in setup.methods:
        t = times.get(("v", label), [])
        v = VariantResult(
            label=label, plan=name, knobs=dict(knobs), device=device, dtype=dtype, batch=batch,
            threads=nthreads, gmacs=setup.gmacs[label], tokens=list(setup.tokens[label]), times=t,
            mode=mode, backend=backend, error=errors.get(("v", label)),
            prep_s=None if backend == "eager" else prep.get(("v", label)),
            peak_mem_mib=peaks.get(("v", label)), **_speeds(t, base_t, batch))
        _add_limit(v, setup, times, errors, base_t)
        _add_intervals(v, base_t, calls)
        out.append(v)
    return out


def _add_limit(v: VariantResult, setup: _Setup, times: dict, errors: dict,
               base_t: list[float] | None) -> None:
    key = ("l", tuple(v.tokens))
    if key[1] not in setup.limits:
        return
    v.limit_gmacs = setup.limit_gmacs[key[1]]
    if key in errors and v.error is None:
        v.error = f"limit: {errors[key]}"
    lt = times.get(key)
    if not lt:
        return
    v.limit_times = lt
    v.limit_ips_median = statistics.median(v.batch / s for s in lt)
    v.limit_ms_p50 = statistics.median(lt) * 1e3
    if base_t:
        v.limit_speedup = v.limit_ips_median / statistics.median(v.batch / s for s in base_t)
    if v.times:
        v.reduction_share = 1 - statistics.median(lt) / statistics.median(v.times)
        if v.limit_speedup is not None:
            v.efficiency = v.speedup / v.limit_speedup
        v.efficiency_best = min(lt) / min(v.times)


def _add_intervals(v: VariantResult, base_t: list[float] | None, calls: int) -> None:
    """Paired 95% intervals of the variant's ratios, each the ratio its point value is."""
    if not v.times:
        return
    rate = [1 / s for s in v.times]
    if base_t:  # speed-up: median img/s over the baseline's
        v.speedup_ci = paired_ratio_interval(rate, [1 / s for s in base_t], calls)
    if v.limit_times:  # efficiency: median img/s over the limit's
        v.efficiency_ci = paired_ratio_interval(rate, [1 / s for s in v.limit_times], calls)
        share = paired_ratio_interval(v.limit_times, v.times, calls)  # limit p50 / variant p50
        v.reduction_share_ci = None if share is None else (1 - share[1], 1 - share[0])


# --------------------------------------------------------------------------------------
# Profile: where a forward pass spends its time
# --------------------------------------------------------------------------------------


@dataclass
class ProfileResult:
    """``imagepiece bench --profile``: per plan, the parts of one forward pass
    (:func:`imagepiece.measure.profile.profile_forward`)."""

    config: dict[str, Any]
    machine: dict[str, Any]
    rows: dict[str, list[ProfileRow]]  # plan label -> parts
    gmacs: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "machine": self.machine, "gmacs": self.gmacs,
                "profile": {label: [dataclasses.asdict(r) for r in rows]
                            for label, rows in self.rows.items()}}


def run_profile(config: BenchConfig, progress: Callable[[int, int, str], None] | None = None
                ) -> ProfileResult:
    """Split ``config.runs`` forward passes of every plan (CPU, eager, inference, the first batch
    size and thread count) into the block compute and each part of the reduction: with
    ``torch.profiler`` (milliseconds and ATen operations) or, with ``clock="wall"``, wall-clock
    timers around the same parts, the plans interleaved round by round (milliseconds only).
    Raises :class:`BenchError` first for a request it cannot profile."""
    req = _validate(config)
    asked = {"--mode": (config.mode, "inference"), "--device": (req.devices[0], "cpu"),
             "--backend": (req.backends[0], "eager"), "--dtype": (req.dtypes[0], "fp32")}
    for flag, (value, allowed) in asked.items():
        if value != allowed:
            raise BenchError(f"--profile times CPU ops of eager fp32 inference; got {flag} {value} "
                             f"(allowed: {allowed})")
    if config.amp:
        raise BenchError("--profile times CPU ops of eager fp32 inference; --amp is not allowed")
    if config.clock not in CLOCKS:
        raise BenchError(f"--clock {config.clock!r} is not allowed; expected one of {', '.join(CLOCKS)}")
    config = dataclasses.replace(config, limit=False)  # no limits: nothing is timed against them
    base, _ = _create_model(config)
    gen = torch.Generator().manual_seed(config.seed)
    setup = _setup(config, base, gen)
    batch, threads = req.batches[0], req.threads[0]
    x = torch.randn(batch, *setup.image, generator=gen)
    # the runtime with a plan that reduces nothing labels its blocks
    models = {label: (patch(copy.deepcopy(m), "none") if label == "none" else m).eval()
              for label, m in setup.models.items()}
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        if config.clock == "wall":
            if config.allocator == "steady":
                steady_allocator()  # as the bench times: no page faults left by another plan
            if progress is not None:
                progress(0, 1, f"timing the parts of {len(models)} plans, interleaved")
            rows = wall_forward_parts(models, x, runs=config.runs, warmup=config.warmup,
                                      seed=config.seed)
        else:
            rows = {}
            for i, (label, model) in enumerate(models.items()):
                if progress is not None:
                    progress(i, len(models), f"profiling {label}")
                rows[label] = profile_forward(model, x, runs=config.runs, warmup=config.warmup)
    finally:
        torch.set_num_threads(old)
    cfg = {"model": config.model, "methods": [m[0] for m in setup.methods], "batch": batch,
           "threads": threads, "runs": config.runs, "warmup": config.warmup, "clock": config.clock}
    return ProfileResult(cfg, machine_info(["cpu"]), rows, setup.gmacs)
