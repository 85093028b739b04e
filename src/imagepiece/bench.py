"""Throughput benchmark that users can trust (SPEC §7).

Every variant (the unmodified model, each reduction plan and each plan's *limit*) is measured in
one process, interleaved round-robin: every round runs every variant once on the same input
tensor, in ``torch.inference_mode()``, synchronising CUDA around each timed call. Results are
medians with their spread and ratios to the unmodified model, both as a ratio of medians and as
the median of per-round ratios (robust to a shared, noisy machine).

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
import difflib
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .bench_backends import BACKENDS, MODES, build
from .bench_busy import BusyMonitor
from .bench_report import NOISY_IQR, output_problem, render, write_csv, write_json, write_plot
from .patch.timm import _attention, patch, unpatch
from .plan import PRESETS, make_plan

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
    "parse_method",
    "check_outputs",
    "render",
    "run_benchmark",
    "write_csv",
    "write_json",
    "write_plot",
]

#: ImagePiece hyper-speed on DeiT-S 224: keep rate 0.4 at blocks 3, 6, 9 (re-tokenizing at
#: 2, 5, 8), 1.63 GMACs against 4.60 unmodified; measured at >= 2.5x the unmodified model's
#: images/s on CPU (keep 0.5, 2.5x fewer MACs, ran at 2.3x: the unreduced blocks 0-2 and the
#: selection work keep the speed-up below the MAC ratio).
HYPER_SPEED = "imagepiece-hyper"

#: The unmodified model, ToMe r=13, EViT keep 0.7, ImagePiece keep 0.7 and its hyper-speed.
DEFAULT_METHODS = ("none", "tome", "evit", "imagepiece", HYPER_SPEED)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "float16": "fp16", "half": "fp16",
                  "bfloat16": "bf16"}


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
    grad_checkpointing: bool = False  # training mode: timm's set_grad_checkpointing()
    #: Sample other processes' CPU use and time a calibration kernel around the rounds.
    busy_check: bool = True


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
    #: ``reasons`` and the readings (see :mod:`imagepiece.bench_busy`).
    busy: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "machine": self.machine,
                "random_weights": self.random_weights, "weights": self.weights,
                "variants": [v.as_dict() for v in self.variants], "busy": self.busy}


# --------------------------------------------------------------------------------------
# Method specs: "name" or "name:knob=value,knob=value"; list values separated by ";"
# --------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
    text = text.strip()
    if ";" in text:
        return tuple(_parse_value(p) for p in text.split(";") if p.strip())
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low == "none":
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    """``"evit:keep_rate=0.5"`` -> ``("evit", {"keep_rate": 0.5})``.

    Syntax: a preset name, optionally ``:`` and comma-separated ``knob=value`` pairs; a list
    value separates its items with ``;`` (``imagepiece:keep_rate=0.5,blocks=1;4;7``, ToMe's
    ``(r, inflection)`` schedule as ``tome:r=16;-0.5``). Only the syntax is checked here.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise BenchError(f"empty method spec {spec!r}; expected e.g. 'evit' or 'evit:keep_rate=0.5'")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise BenchError(f"unknown method {name!r} in {spec!r}{hint}; allowed: {', '.join(PRESETS)}")
    knobs: dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise BenchError(f"bad knob {item!r} in method {spec!r}; expected knob=value, "
                             "e.g. 'evit:keep_rate=0.5' or 'imagepiece:blocks=1;4;7'")
        knobs[key.strip()] = _parse_value(value)
    return name, knobs


def use_method(model: nn.Module, spec: str, registered: bool = False) -> nn.Module:
    """Put ``model`` under the plan of ``spec``. ``none`` unpatches a plain timm model (the exact
    original); a ``registered`` ``imagepiece_*`` model, created patched, gets the zero plan.
    Raises ``ValueError``/``TypeError`` when the spec or its plan does not fit the model."""
    name, knobs = parse_method(spec)
    if name == "none" and not registered:
        return unpatch(model)
    return patch(model, name, **knobs)


def format_method(name: str, knobs: dict[str, Any]) -> str:
    """The spec :func:`parse_method` reads back: ``("evit", {"keep_rate": 0.5})`` ->
    ``"evit:keep_rate=0.5"``."""

    def fmt(v):
        return ";".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
    return name + (":" + ",".join(f"{k}={fmt(v)}" for k, v in knobs.items()) if knobs else "")


def _knob_names(name: str) -> set[str]:
    import inspect

    factory = PRESETS[name]
    params = inspect.signature(factory).parameters
    if "kw" in params:  # forwards its knobs to the imagepiece factory
        params = inspect.signature(PRESETS["imagepiece"]).parameters
    # functools.partial presets keep the partial's keywords in their signature
    return set(params) - {"depth", "kw"}


def _expand_methods(config: BenchConfig, depth: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, preset, knobs) for every variant; the unmodified model is always first."""
    out: list[tuple[str, str, dict[str, Any]]] = [("none", "none", {})]
    seen = {"none"}
    for spec in config.methods:
        name, knobs = parse_method(spec)
        names = _knob_names(name)
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
    dev = str(device).strip().lower()
    if dev == "cpu":
        return dev
    if dev == "cuda" or (dev.startswith("cuda:") and dev[5:].isdigit()):
        if not torch.cuda.is_available():
            raise BenchError(f"device {device!r} was asked for but CUDA is not available on this "
                             "machine; allowed here: cpu")
        if ":" in dev and int(dev[5:]) >= torch.cuda.device_count():
            raise BenchError(f"device {device!r} does not exist; this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise BenchError(f"unknown device {device!r}; allowed: cpu, cuda, cuda:N")


def _check_dtype(dtype: str) -> str:
    d = str(dtype).strip().lower()
    d = _DTYPE_ALIASES.get(d, d)
    if d not in DTYPES:
        raise BenchError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    return d


def _create_model(config: BenchConfig) -> tuple[nn.Module, str]:
    import timm

    name = config.model
    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm.list_models(), n=3)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise BenchError(f"unknown timm model {name!r}.{hint} See timm.list_models() for the "
                         "allowed names.")
    torch.manual_seed(config.seed)
    try:
        model = timm.create_model(name, pretrained=config.pretrained, **config.model_kwargs)
    except Exception as e:  # noqa: BLE001 (timm/hub raise many kinds)
        if config.pretrained:
            raise BenchError(f"could not load timm's pretrained weights for {name!r} (no internet "
                             f"or not cached?): {type(e).__name__}: {e}. Run without --pretrained "
                             "for random weights, or pass --checkpoint FILE.") from None
        raise BenchError(f"could not create timm model {name!r} with {config.model_kwargs}: "
                         f"{type(e).__name__}: {e}") from None
    weights = "timm pretrained" if config.pretrained else "random (nothing is downloaded)"
    if config.checkpoint:
        _load_checkpoint(model, config.checkpoint)
        weights = f"checkpoint {config.checkpoint}"
    # A registered imagepiece_* model is created under a plan: the baseline is the network
    # itself, unreduced (issue 14, item 1).
    return unpatch(model).eval(), weights


def _load_checkpoint(model: nn.Module, path: str) -> None:
    from .checkpoint import load_weights

    try:
        load_weights(model, path, strict=True, adapt=False)
    except ValueError as e:  # CheckpointError: missing, unreadable, unsafe or not fitting
        raise BenchError(str(e)) from None


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4


def steady_allocator() -> str:
    """Make glibc keep freed memory in the process for the rest of its life.

    By default glibc serves blocks above its (adaptive, at most 32 MiB) mmap threshold with
    fresh ``mmap`` calls and returns them on free, so each such activation buffer is zero-filled
    again by the kernel (page faults) on its next use. How often that happens depends on what
    ran just before, which biased interleaved timings by up to 10% on DeiT-S batch 32 (the
    unmodified model vs the identical limit run). With mmap off and trimming off the heap grows
    to the peak working set once and is reused. Returns what was done ("steady (glibc)", or
    "default" where the C library is not glibc). Process-wide and not undone.
    """
    import ctypes
    import ctypes.util

    if platform.system() != "Linux":
        return "default"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return "default"
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**30) == 1
    return "steady (glibc)" if ok else "default"


def machine_info(devices: Sequence[str] = ()) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import timm

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "timm": timm.__version__, "torch_threads": torch.get_num_threads()}
    if any(d.startswith("cuda") for d in devices):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --------------------------------------------------------------------------------------
# The limit: the same blocks on sequences already cut to the plan's token counts
# --------------------------------------------------------------------------------------


class LimitViT(nn.Module):
    """Runs ``model``'s blocks on pre-cut sequences: the fastest any implementation of a plan
    with these token counts can be (prefix handling and selection are ignored on purpose)."""

    def __init__(self, model: nn.Module, tokens: Sequence[tuple[int, int]]):
        super().__init__()
        self.model = model
        self.tokens = [tuple(t) for t in tokens]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.utils.checkpoint import checkpoint

        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(x))))
        ckpt = m.grad_checkpointing and self.training and torch.is_grad_enabled()
        for blk, (n_in, n_out) in zip(m.blocks, self.tokens, strict=True):
            if ckpt:
                x = checkpoint(_limit_block, blk, x, n_in, n_out, use_reentrant=False)
            else:
                x = _limit_block(blk, x, n_in, n_out)
        return m.forward_head(m.norm(x))


def _limit_block(blk: nn.Module, x: torch.Tensor, n_in: int, n_out: int) -> torch.Tensor:
    if x.shape[1] != n_in:
        x = x[:, :n_in]
    x = x + blk.drop_path1(blk.ls1(_attention(blk.attn, blk.norm1(x), None)[0]))
    if n_out != n_in:
        x = x[:, :n_out]
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


# --------------------------------------------------------------------------------------
# Measurement
# --------------------------------------------------------------------------------------


def count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates per image (FLOPs / 2 / batch), counted from the ops that run.

    Attention runs on SDPA's math backend here: the counter has no formula for the fused CPU
    kernel (torch 2.14 counts nothing for it, 0.36 of DeiT-S's 4.6 GMACs), while the math
    backend's matmuls are counted exactly. Timing still uses the fused kernels.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9


def _quantiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _peak_mem(fn: Callable, x: torch.Tensor, device: str, autocast) -> float | None:
    if not device.startswith("cuda"):
        return None
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    with torch.inference_mode(), autocast():
        fn(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def time_interleaved(fns: Mapping[Any, Callable[[torch.Tensor], Any]], x: torch.Tensor, warmup: int,
                     runs: int, rng: random.Random | None = None,
                     step: Callable[[Any], None] | None = None) -> dict[Any, list[float]]:
    """Seconds of each ``fn(x)``, round by round in a new random order each round, so a slow
    spell of a shared machine hits every variant alike; the first ``warmup`` rounds are dropped.

    Runs under ``torch.inference_mode``; CUDA is synchronised around each call.
    """
    rng = rng or random.Random(0)
    sync = x.device.type == "cuda"
    times: dict[Any, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for rnd in range(warmup + runs):
            order = list(fns)
            rng.shuffle(order)  # no variant always follows the same one
            for key in order:
                if sync:
                    torch.cuda.synchronize(x.device)
                t0 = time.perf_counter()
                fns[key](x)
                if sync:
                    torch.cuda.synchronize(x.device)
                if rnd >= warmup:
                    times[key].append(time.perf_counter() - t0)
                if step is not None:
                    step(key)
    return times


def run_benchmark(
    config: BenchConfig,
    progress: Callable[[int, int, str], None] | None = None,
) -> BenchResult:
    """Validate ``config`` (raising :class:`BenchError` before any timing), then measure.

    ``progress(done, total, what)`` is called after each timed forward pass.
    """
    # ---- validation: everything that can fail, fails here --------------------------------
    batches = _check_positive("batch size", config.batch_sizes)
    _check_positive("runs", [config.runs])
    _check_positive("warmup", [config.warmup], low=0)
    threads = _check_positive("threads", config.threads) if config.threads else [
        torch.get_num_threads()]
    devices = [_check_device(d) for d in (config.devices or ["cpu"])]
    dtypes = [_check_dtype(d) for d in (config.dtypes or ["fp32"])]
    for kr in config.keep_rates:
        if isinstance(kr, bool) or not isinstance(kr, (int, float)) or not 0 < kr <= 1:
            raise BenchError(f"keep rate {kr!r} is outside (0, 1]; expected 0 < keep_rate <= 1")
    _check_positive("r", config.rs, low=0) if config.rs else None
    if config.allocator not in ("steady", "default"):
        raise BenchError(f"allocator={config.allocator!r}; allowed: steady, default")
    if not config.methods:
        raise BenchError(f"no methods given; allowed: {', '.join(PRESETS)}")
    for spec in config.methods:  # syntax and preset names before the (slow) model creation
        parse_method(spec)
    base, weights = _create_model(config)
    if not hasattr(base, "blocks"):
        raise BenchError(f"model {config.model!r} has no transformer blocks; imagepiece supports "
                         "timm VisionTransformer models")
    methods = _expand_methods(config, len(base.blocks))
    img = base.patch_embed.img_size if hasattr(base, "patch_embed") else (224, 224)
    in_chans = getattr(base.patch_embed.proj, "in_channels", 3)

    models: dict[str, nn.Module] = {}
    for label, name, knobs in methods:
        if label == "none":
            models[label] = base
            continue
        try:
            models[label] = patch(copy.deepcopy(base), name, **knobs)
        except (TypeError, ValueError) as e:
            raise BenchError(f"cannot apply {label!r} to {config.model!r}: {e}") from None

    num_tokens = base.patch_embed.num_patches + base.num_prefix_tokens
    tokens = {label: ([(num_tokens, num_tokens)] * len(base.blocks) if label == "none" else
                      models[label].imagepiece.token_counts(num_tokens)) for label in models}
    limits: dict[tuple, nn.Module] = {}
    if config.limit:
        for label in models:
            key = tuple(tokens[label])
            limits.setdefault(key, LimitViT(base, tokens[label]))

    # ---- measurement ----------------------------------------------------------------------
    results: list[VariantResult] = []
    groups = [(d, t, b, th) for d in devices for t in dtypes for b in batches for th in threads]
    n_fns = len(models) + len(limits)
    total = len(groups) * n_fns * (config.warmup + config.runs)
    done = 0
    old_threads = torch.get_num_threads()
    rng = random.Random(config.seed)
    allocator = steady_allocator() if config.allocator == "steady" else "default"
    gen = torch.Generator().manual_seed(config.seed)
    flop_x = torch.randn(1, in_chans, *img, generator=gen)
    gmacs = {label: count_gmacs(m, flop_x) for label, m in models.items()}
    limit_gmacs = {key: count_gmacs(m, flop_x) for key, m in limits.items()}
    try:
        for device, dtype, batch, nthreads in groups:
            torch.set_num_threads(nthreads)
            for m in models.values():
                m.to(device)
            x = torch.randn(batch, in_chans, *img, generator=gen).to(device)
            dt = DTYPES[dtype]

            def autocast(device=device, dt=dt):
                return torch.autocast(device.split(":")[0], dtype=dt, enabled=dt != torch.float32)

            fns: dict[tuple[str, Any], Callable] = {("v", label): m for label, m in models.items()}
            fns.update({("l", key): m for key, m in limits.items()})

            def step(key, where=f"{device} {dtype} b{batch} t{nthreads}") -> None:
                nonlocal done
                done += 1
                if progress is not None:
                    progress(done, total, f"{where}: {key[1] if key[0] == 'v' else 'limit'}")

            with autocast():
                times = time_interleaved(fns, x, config.warmup, config.runs, rng, step)
            results += _summarise(models, tokens, times, gmacs, limit_gmacs, methods, device,
                                  dtype, batch, nthreads, x, autocast)
    finally:
        torch.set_num_threads(old_threads)
        for m in models.values():
            m.to("cpu")

    cfg = dataclasses.asdict(config)
    cfg.update(allocator=allocator, methods=list(config.methods), batch_sizes=batches, threads=threads,
               devices=devices, dtypes=dtypes, keep_rates=list(config.keep_rates),
               rs=list(config.rs))
    random_weights = not config.pretrained and not config.checkpoint
    return BenchResult(cfg, machine_info(devices), random_weights, weights, results)


def _summarise(models, tokens, times, gmacs, limit_gmacs, methods, device, dtype, batch,
               nthreads, x, autocast) -> list[VariantResult]:
    base_t = times[("v", "none")]
    base_ips = statistics.median(batch / s for s in base_t)
    out = []
    for label, name, knobs in methods:
        t = times[("v", label)]
        ips = [batch / s for s in t]
        q1, q3 = _quantiles(ips)
        med = statistics.median(ips)
        v = VariantResult(
            label=label, plan=name, knobs=dict(knobs), device=device, dtype=dtype, batch=batch,
            threads=nthreads, gmacs=gmacs[label], tokens=list(tokens[label]), times=t,
            ips_median=med, ips_q1=q1, ips_q3=q3, ips_min=min(ips), ips_max=max(ips),
            speedup=med / base_ips,
            speedup_rounds=statistics.median(b / s for b, s in zip(base_t, t, strict=True)),
            speedup_best=min(base_t) / min(t),
        )
        key = ("l", tuple(tokens[label]))
        if key in times:
            lt = times[key]
            v.limit_gmacs = limit_gmacs[key[1]]
            v.limit_times = lt
            v.limit_ips_median = statistics.median(batch / s for s in lt)
            v.limit_speedup = v.limit_ips_median / base_ips
            v.efficiency = v.speedup / v.limit_speedup
            v.efficiency_best = min(lt) / min(t)
        v.peak_mem_mib = _peak_mem(models[label], x, device, autocast)
        out.append(v)
    return out
