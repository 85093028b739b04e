"""``imagepiece train``: the DeiT recipe from timm's pieces, on one process or under torchrun.

Defaults are DeiT's (RandAugment m9, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random
erasing 0.25, AdamW lr 5e-4 x global batch / 512, weight decay 0.05, cosine with 5 warm-up
epochs, drop path 0.1) and EViT's keep-rate warm-up (SPEC §4.4). Every default is a field of
:class:`TrainConfig`, overridable from a YAML file and the command line; every value is type-
and range-checked before any work, and the resolved config is saved in the run directory. A
checkpoint is written after every epoch, and ``resume`` restores model, optimizer, scheduler,
EMA, AMP scaler, step counters and every process's RNG state, so a killed run continues with
the same data order and ends with the same weights. A run folder is locked while a run uses it
and is never silently reused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import (
    CheckpointError,
    find_checkpoint,
    kill_point,
    load_checkpoint,
    load_weights,
    misfit_summary,
    save_checkpoint,
)
from .data import DATASET_KINDS, SPLITS, DataError, TransformConfig, build_dataset, num_classes_of
from .distributed import DistInfo, all_reduce_sum, broadcast_object, check_device, finish, setup_distributed
from .evaluate import evaluate_model, make_eval_loader
from .options import OptionError, check_output_dir, parse_bool

__all__ = ["ConfigError", "DistInfo", "TrainConfig", "create_model", "resolve_config", "resume_config",
           "setup_distributed", "train"]

LOCK_FILE = ".lock"
SCHEDULES = ("cosine", "tanh", "step", "multistep", "poly")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "box", "hamming", "lanczos")
ERASE_MODES = ("pixel", "rand", "const")
MIXUP_MODES = ("batch", "pair", "elem")
# What a resumed run must keep: these decide the model's tensors, its data or where it lives.
FIXED_ON_RESUME = ("model", "model_kwargs", "img_size", "num_classes", "dataset", "pretrained", "finetune",
                   "finetune_ema", "finetune_new_head", "output", "name")


class ConfigError(ValueError):
    """A training option has a value that is not allowed."""


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults are the DeiT/EViT recipe."""

    # model
    model: str = "deit_small_patch16_224"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "none"  # a plan preset, optionally with knobs: "evit:keep_rate=0.7"
    keep_rate: float | None = None
    r: int | None = None
    pretrained: bool = False
    finetune: str | None = None  # checkpoint file or run directory to start from
    finetune_ema: bool = False
    finetune_new_head: bool = False  # fine-tuning to other classes: a classifier of another size starts new
    drop_path: float = 0.1
    drop: float = 0.0
    # data
    dataset: str = "imagefolder"
    data_root: str | None = None
    img_size: int | None = None  # None: 224 for imagefolder, 32 for fashion-mnist/synthetic
    num_classes: int | None = None  # None: from the dataset
    train_split: str = "train"
    val_split: str = "val"
    data_length: int | None = None  # synthetic only
    strict_data: bool = False
    workers: int = 4
    # augmentation
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    color_jitter: float = 0.3
    hflip: float = 0.5
    scale: list[float] | None = None
    interpolation: str = "bicubic"
    crop_pct: float | None = None
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    smoothing: float = 0.1
    # optimisation
    epochs: int = 300
    batch_size: int = 128  # per process
    opt: str = "adamw"
    base_lr: float = 5e-4  # scaled by global batch / lr_base_batch
    lr_base_batch: int = 512
    lr: float | None = None  # absolute learning rate, overrides the scaling
    weight_decay: float = 0.05
    opt_eps: float = 1e-8
    momentum: float = 0.9
    clip_grad: float | None = None
    sched: str = "cosine"
    warmup_epochs: int = 5
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    cooldown_epochs: int = 0
    sched_on_epochs: bool = False  # False: the lr changes every iteration
    # EViT keep-rate warm-up; None: EViT's 10 and 100 epochs of 300, scaled to `epochs`
    # (fractions allowed: a 1-epoch fine-tune can shrink over its first half)
    shrink_start: float | None = None
    shrink_epochs: float | None = None
    ema: bool = False
    ema_decay: float = 0.99996
    amp: bool = True  # CUDA only
    # run
    seed: int = 0
    device: str = "auto"
    threads: int | None = None  # torch.set_num_threads; None: torch's default (torchrun: 1)
    output: str = "runs"
    name: str | None = None
    progress: bool = True
    stop_after_steps: int | None = None  # debug: exit after N steps without saving (a kill)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


# --------------------------------------------------------------------------------------
# Options: read, typed, range-checked
# --------------------------------------------------------------------------------------


def resolve_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None,
                   base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a saved run's config), then the YAML file, then ``overrides``."""
    values: dict[str, Any] = dict(base or {})
    if config_file:
        values.update(_read_yaml_options(config_file))
    values.update(overrides or {})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    for key, value in values.items():
        values[key] = _coerce(key, value)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def _read_yaml_options(path: str) -> dict[str, Any]:
    """The ``option: value`` mapping of a YAML file (``-`` in names read as ``_``)."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())
        raise ConfigError(f"config file {path!r} is not valid YAML: {reason}") from None
    if not isinstance(loaded, dict) or not all(isinstance(k, str) for k in loaded):
        raise ConfigError(f"config file {path!r} must hold a mapping of option: value")
    return {k.replace("-", "_"): v for k, v in loaded.items()}


def _coerce(key: str, value: Any) -> Any:
    """``value`` of option ``key`` in the type its field declares, or a ConfigError naming both.

    YAML reads ``1e-6`` (no dot) and ``maybe`` as strings: a number in a string is converted,
    anything else of the wrong type (``lr: [1, 2]``, ``method: 7``, ``epochs: 2.5``, ``ema:
    maybe``) is refused here rather than failing, or silently counting as true, later.
    """
    kind = str(_FIELDS[key].type)
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key}=null is not allowed; expected {kind}")
    base = kind.split("|")[0].strip()
    if base == "bool":
        try:
            return parse_bool(value, key)
        except OptionError as e:
            raise ConfigError(str(e)) from None
    if base in ("int", "float"):
        return _number(key, value, base)
    if base == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}={value!r} is not allowed; expected a string")
        return value
    if base.startswith("list"):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not allowed; expected a list of numbers")
        return [_number(key, v, "float") for v in value]
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):  # dict[str, Any]
        raise ConfigError(f"{key}={value!r} is not allowed; expected a mapping of name: value")
    return dict(value)


def _number(key: str, value: Any, kind: str) -> int | float:
    """An int (``kind="int"``, no fractions) or a finite float, from a number or its string."""
    if isinstance(value, str):
        try:
            whole = kind == "int" and value.strip().lstrip("+-").isdigit()
            value = int(value) if whole else float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} is not a number") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{key}={value!r} is not allowed; expected a finite number")
    if kind == "int":
        if not isinstance(value, int):
            raise ConfigError(f"{key}={value!r} is not allowed; expected a whole number")
        return value
    return float(value)


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["epochs=10", "scale=[0.5, 1.0]"]`` -> ``{"epochs": 10, "scale": [0.5, 1.0]}`` (YAML values)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or not key:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE")
        if key not in _FIELDS:
            raise ConfigError(f"--set {item!r}: unknown option {key!r}; allowed: {', '.join(_FIELDS)}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            raise ConfigError(f"--set {item!r}: {value!r} is not a YAML value") from None
    return out


def _in_range(cfg: TrainConfig, name: str, low: float | None = None, high: float | None = None,
              low_open: bool = False, high_open: bool = False) -> None:
    """Refuse ``cfg.name`` outside [low, high] (open ends where asked); None passes."""
    value = getattr(cfg, name)
    if value is None:
        return
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if below or above:
        if high is None:
            expected = f"{'>' if low_open else '>='} {low:g}"
        else:
            expected = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{name}={value!r} is not allowed; expected a value {expected}")


def _one_of(cfg: TrainConfig, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(cfg, name)
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not allowed; allowed: {', '.join(allowed)}")


def _validate(cfg: TrainConfig) -> None:
    """Range and choice checks of a typed config; the method spec and paths are checked too."""
    for name in ("epochs", "batch_size", "lr_base_batch", "img_size", "num_classes", "threads",
                 "data_length"):
        _in_range(cfg, name, 1)
    for name in ("workers", "warmup_epochs", "cooldown_epochs", "seed", "recount", "stop_after_steps",
                 "weight_decay", "momentum", "warmup_lr", "min_lr", "mixup", "cutmix", "color_jitter",
                 "shrink_start", "shrink_epochs", "r"):
        _in_range(cfg, name, 0)
    for name in ("base_lr", "lr", "opt_eps", "clip_grad"):
        _in_range(cfg, name, 0, low_open=True)
    for name in ("reprob", "hflip", "mixup_prob", "mixup_switch_prob"):
        _in_range(cfg, name, 0, 1)
    for name in ("smoothing", "drop_path", "drop"):
        _in_range(cfg, name, 0, 1, high_open=True)
    _in_range(cfg, "keep_rate", 0, 1, low_open=True)
    _in_range(cfg, "crop_pct", 0, 1, low_open=True)
    _in_range(cfg, "ema_decay", 0, 1, low_open=True, high_open=True)
    if cfg.scale is not None and not (len(cfg.scale) == 2 and 0 < cfg.scale[0] <= cfg.scale[1] <= 1):
        raise ConfigError(f"scale={cfg.scale!r} is not allowed; expected [low, high] with "
                          "0 < low <= high <= 1 (shares of the image area)")
    _one_of(cfg, "mixup_mode", MIXUP_MODES)
    _one_of(cfg, "interpolation", INTERPOLATIONS)
    _one_of(cfg, "remode", ERASE_MODES)
    _one_of(cfg, "sched", SCHEDULES)
    _one_of(cfg, "dataset", DATASET_KINDS)
    _one_of(cfg, "train_split", SPLITS)
    _one_of(cfg, "val_split", SPLITS)
    _check_optimizer(cfg.opt)
    try:
        check_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size={cfg.batch_size} must be even with Mixup/CutMix (timm pairs "
                          "each image with the batch reversed); set mixup=0 and cutmix=0 otherwise")
    if cfg.name is not None and (not cfg.name.strip() or cfg.name in (".", "..")):
        raise ConfigError(f"name={cfg.name!r} is not allowed; expected a folder name")
    if cfg.finetune is not None and not os.path.exists(cfg.finetune):
        raise ConfigError(f"finetune={cfg.finetune!r} does not exist; expected a checkpoint file or "
                          "run folder")
    _check_method(cfg)


def _check_optimizer(name: str) -> None:
    from timm.optim import list_optimizers

    allowed = list_optimizers()
    if name.lower() not in allowed:
        raise ConfigError(f"opt={name!r} is not allowed; any of timm's optimizers, e.g. adamw, sgd, "
                          f"lamb ({len(allowed)} in timm.optim.list_optimizers())")


def _check_method(cfg: TrainConfig) -> None:
    """The method spec parses, and ``keep_rate``/``r`` are not given to a method that ignores them."""
    from .plan import parse_method

    try:
        preset, _ = parse_method(cfg.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    given = [f"{n}={getattr(cfg, n)!r}" for n in ("keep_rate", "r") if getattr(cfg, n) is not None]
    if preset == "none" and given:
        raise ConfigError(f"{', '.join(given)} with method='none' (no reduction) would be ignored; "
                          "choose a method, e.g. --method evit or --method tome")


# --------------------------------------------------------------------------------------
# Model, data, optimisation
# --------------------------------------------------------------------------------------


def _default_img_size(cfg: TrainConfig) -> int:
    if cfg.img_size is not None:
        return cfg.img_size
    return 224 if cfg.dataset == "imagefolder" else 32


def create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """The timm model of ``cfg`` with its plan applied; returns (model, base plan or None).

    Any timm name works; ``imagepiece_*`` names (local coherence bias + plan) get the plan at
    creation, other names are patched unless the method is ``none``. ``finetune`` weights are
    loaded before patching (the plan does not change parameter names); a checkpoint of another
    architecture is refused, a classifier of another size only with ``finetune_new_head``.
    """
    import timm

    from . import is_patched, patch
    from .plan import parse_method

    try:
        preset, knobs = parse_method(cfg.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.keep_rate is not None:
        knobs["keep_rate"] = cfg.keep_rate
    if cfg.r is not None:
        knobs["r"] = cfg.r
    if not timm.is_model(cfg.model):
        raise ConfigError(f"unknown model {cfg.model!r}; any timm.list_models() name or a registered "
                          "imagepiece_* name (e.g. imagepiece_deit_small_patch16_224)")
    kwargs = dict(img_size=_default_img_size(cfg), num_classes=num_classes,
                  drop_path_rate=cfg.drop_path, drop_rate=cfg.drop)
    kwargs.update(cfg.model_kwargs)
    own_plan = cfg.model.startswith("imagepiece_")
    if own_plan:
        kwargs.update(plan=preset, **knobs)
    try:
        model = timm.create_model(cfg.model, pretrained=cfg.pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError) as e:
        raise ConfigError(f"cannot create {cfg.model!r} with {kwargs}: {e}") from None
    except Exception as e:  # noqa: BLE001  (hub downloads fail in many ways)
        if cfg.pretrained:
            raise ConfigError(f"cannot load timm's pretrained weights for {cfg.model!r} (offline?): "
                              f"{type(e).__name__}: {e}; use --finetune FILE instead") from None
        raise
    if cfg.finetune:
        _load_finetune(model, cfg)
    if not own_plan and preset != "none":
        try:
            patch(model, preset, **knobs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method {cfg.method!r} (knobs {knobs}): {e}") from None
    return model, (model.imagepiece.plan if is_patched(model) else None)


def _load_finetune(model: nn.Module, cfg: TrainConfig) -> None:
    """Start from ``cfg.finetune``; tensors it cannot have (a new coherence branch, a new
    classifier with ``finetune_new_head``) keep their initialisation, with a warning."""
    report = load_weights(model, cfg.finetune, use_ema=cfg.finetune_ema, strict=True, adapt=True,
                          new_head=cfg.finetune_new_head)
    if report["missing"] or report["unexpected"]:
        warnings.warn(f"fine-tuning from {cfg.finetune!r}: {len(report['missing'])} tensor(s) keep "
                      f"their initialisation {report['missing'][:8]}, "
                      f"{len(report['unexpected'])} unused {report['unexpected'][:8]}", stacklevel=3)


def _shrink_schedule(cfg: TrainConfig) -> tuple[float, float]:
    """EViT's warm-up: keep everything for 10 of 300 epochs, then shrink over 100 (scaled)."""
    start = cfg.shrink_start if cfg.shrink_start is not None else round(cfg.epochs * 10 / 300)
    length = cfg.shrink_epochs if cfg.shrink_epochs is not None else round(cfg.epochs * 100 / 300)
    return start, length


def _build_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, val) datasets with the DeiT train / eval transforms of ``cfg``."""
    tcfg = TransformConfig(
        auto_augment=cfg.aa or None, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        color_jitter=cfg.color_jitter, hflip=cfg.hflip,
        scale=tuple(cfg.scale) if cfg.scale else None, interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct)
    common = dict(kind=cfg.dataset, root=cfg.data_root, img_size=_default_img_size(cfg),
                  transform_cfg=tcfg, strict=cfg.strict_data,
                  num_classes=cfg.num_classes if cfg.num_classes is not None else 10,
                  length=cfg.data_length, seed=cfg.seed)
    try:
        train_ds = build_dataset(split=cfg.train_split, train_transform=True, **common)
    except (AssertionError, KeyError) as e:  # timm's transform factory on an unknown aa string
        raise ConfigError(f"aa={cfg.aa!r} is not an augmentation timm knows "
                          f"(e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, or null): {e!r}") from None
    class_to_idx = getattr(train_ds, "class_to_idx", None)
    val_ds = build_dataset(split=cfg.val_split, train_transform=False, class_to_idx=class_to_idx, **common)
    return train_ds, val_ds


def _make_loaders(cfg: TrainConfig, info: DistInfo, train_ds: Any, val_ds: Any) -> tuple[Any, Any, Any]:
    """(sampler, train loader, val loader); the sampler's order depends only on (seed, epoch)
    for one or many processes, which is what makes a resumed run read the same batches."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    # More loader processes than CPUs only compete with the model for them (and torch warns).
    workers = min(cfg.workers, os.cpu_count() or 1)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=info.device.type == "cuda")
    if len(loader) == 0:
        raise DataError(f"the training set has {len(train_ds)} images, fewer than one batch of "
                        f"{cfg.batch_size} x {info.world_size} processes")
    val_loader = make_eval_loader(val_ds, cfg.batch_size, workers, info.rank, info.world_size,
                                  info.device.type == "cuda")
    return sampler, loader, val_loader


def _make_optimisation(cfg: TrainConfig, info: DistInfo, model: nn.Module, steps_per_epoch: int
                       ) -> tuple[Any, Any, Any]:
    """(optimizer, per-iteration lr scheduler, AMP grad scaler or None)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    lr = cfg.lr or cfg.base_lr * cfg.batch_size * info.world_size / cfg.lr_base_batch
    extra = {"momentum": cfg.momentum} if cfg.opt in ("sgd", "momentum", "nesterov") else {}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps, **extra)
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=cfg.sched_on_epochs, updates_per_epoch=steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda") if cfg.amp and info.device.type == "cuda" else None
    return optimizer, scheduler, scaler


def _make_loss(cfg: TrainConfig, num_classes: int) -> tuple[Any, nn.Module]:
    """(Mixup/CutMix or None, loss): Mixup already smooths its targets."""
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                      switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                      label_smoothing=cfg.smoothing, num_classes=num_classes)
        return mixup, SoftTargetCrossEntropy()
    if cfg.smoothing > 0:
        return None, LabelSmoothingCrossEntropy(cfg.smoothing)
    return None, nn.CrossEntropyLoss()


# --------------------------------------------------------------------------------------
# The run folder: chosen, locked, never silently reused
# --------------------------------------------------------------------------------------


class _RunLock:
    """An exclusive ``flock`` on ``RUN/.lock`` held while a run uses its folder. The kernel drops
    it when the process ends in any way, so a killed run never leaves a stale lock behind."""

    def __init__(self, run_dir: str):
        self.file = open(os.path.join(run_dir, LOCK_FILE), "a+")  # noqa: SIM115  (held open)
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock, as before
            return
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise ConfigError(f"run folder {run_dir!r} is in use by another training process; wait "
                              "for it to end or choose another --name") from None
        self.file.truncate(0)
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def _run_contents(run_dir: str) -> list[str]:
    return sorted(e for e in os.listdir(run_dir) if e != LOCK_FILE) if os.path.isdir(run_dir) else []


def _refuse_used(run_dir: str, overwrite: bool) -> None:
    """A new run may not mix its files with another run's (unless ``overwrite``)."""
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"run folder {run_dir!r} is a file; choose another --name or --output")
    used = _run_contents(run_dir)
    if used and not overwrite:
        raise ConfigError(f"run folder {run_dir!r} already holds a run ({', '.join(used[:4])}); "
                          f"continue it with --resume {run_dir}, replace it with --overwrite, or choose "
                          "another --name")


def _choose_run_dir(cfg: TrainConfig, resume: str | None) -> str:
    """``resume``, ``output/name``, or a new ``model-method-time`` folder (``-2``, ... when taken)."""
    if resume:
        return resume
    if cfg.name:
        return os.path.join(cfg.output, cfg.name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    stem = os.path.join(cfg.output, f"{cfg.model}-{cfg.method.replace(':', '_')}-{stamp}")
    run_dir, n = stem, 1
    while os.path.lexists(run_dir):
        n += 1
        run_dir = f"{stem}-{n}"
    return run_dir


def _claim(run_dir: str, resume: str | None, overwrite: bool) -> _RunLock:
    """Lock ``run_dir`` for this run; a new run refuses a folder holding another run's files
    (checked again under the lock: a second run may have claimed it in between)."""
    if not resume:
        _refuse_used(run_dir, overwrite)
    os.makedirs(run_dir, exist_ok=True)
    lock = _RunLock(run_dir)
    try:
        if not resume:
            _refuse_used(run_dir, overwrite)
            for entry in _run_contents(run_dir):  # --overwrite: the old run goes, as a whole
                path = os.path.join(run_dir, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
    except BaseException:
        lock.release()
        raise
    return lock


@contextlib.contextmanager
def _claimed(cfg: TrainConfig, info: DistInfo, resume: str | None, overwrite: bool) -> Iterator[str]:
    """The run folder, locked by the main process for the duration; every process gets the same
    folder (a default name holds the time) and the same error when it is refused."""
    lock, outcome = None, None
    if info.main:
        try:
            run_dir = _choose_run_dir(cfg, resume)
            lock = _claim(run_dir, resume, overwrite)
            outcome = ("ok", run_dir)
        except ConfigError as e:
            outcome = ("error", str(e))
        except OSError as e:
            outcome = ("error", f"cannot create the run folder: {e}")
    kind, value = broadcast_object(outcome, info)
    if kind == "error":
        raise ConfigError(value)
    try:
        yield value
    finally:
        if lock is not None:
            lock.release()


def _write_config(run_dir: str, cfg: TrainConfig) -> None:
    import yaml

    tmp = os.path.join(run_dir, ".config.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


def _repair_log(path: str, before_epoch: int, last_row: Mapping[str, Any] | None) -> None:
    """Keep the log lines of the epochs a resumed run will not redo, and restore the line of
    the last saved epoch from its checkpoint when a kill came between the save and the line.
    A half-written line (killed while writing) is dropped."""
    rows = []
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done = isinstance(row, dict) and isinstance(row.get("epoch"), int)
                if done and row["epoch"] < before_epoch:
                    rows.append(row)
    epochs = {r["epoch"] for r in rows}
    if last_row and last_row.get("epoch") == before_epoch - 1 and before_epoch - 1 not in epochs:
        rows.append(dict(last_row))
    with open(path + ".tmp", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    os.replace(path + ".tmp", path)


# --------------------------------------------------------------------------------------
# The run, in steps
# --------------------------------------------------------------------------------------


@dataclass
class _Run:
    """Everything one training run holds between its steps."""

    cfg: TrainConfig
    info: DistInfo
    model: nn.Module
    net: nn.Module  # the model, or its DDP wrapper
    base_plan: Any
    ema: Any
    optimizer: Any
    scheduler: Any
    scaler: Any
    mixup: Any
    loss_fn: nn.Module
    sampler: Any
    loader: Any
    val_loader: Any
    num_classes: int
    progress: _Progress
    run_dir: str = ""
    start_epoch: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1
    last_row: dict[str, Any] | None = None  # the log line saved with the resumed checkpoint

    @property
    def ckpt_dir(self) -> str:
        return os.path.join(self.run_dir, "checkpoints")

    @property
    def log_path(self) -> str:
        return os.path.join(self.run_dir, "log.jsonl")

    @property
    def use_amp(self) -> bool:
        return self.scaler is not None


def train(cfg: TrainConfig, resume: str | None = None, console: Any = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` (or continue the run in directory ``resume``); returns the final summary.

    ``cfg`` of a resumed run should be its saved config (see :func:`resume_config`). A new run
    refuses a folder that already holds a run unless ``overwrite``; nothing is written before
    the data, model and optimiser are built, so a bad option leaves no half-made run folder.
    """
    if resume and overwrite:
        raise ConfigError("--overwrite replaces a run and --resume continues one; give only one")
    if not resume:
        try:
            check_output_dir(cfg.output, "output")
        except OptionError as e:
            raise ConfigError(str(e)) from None
    _import_training_modules()
    info = setup_distributed(cfg.device)
    run = _build_run(cfg, info, console)
    ckpt = _read_resume_checkpoint(run, resume) if resume else None  # a damaged run: before any write
    with _claimed(cfg, info, resume, overwrite) as run_dir:
        run.run_dir = run_dir
        if ckpt is not None:
            _restore(run, ckpt)
        else:
            _seed_everything(cfg.seed + info.rank)  # augmentation differs per process
        _open_log(run, resume)
        summary = _fit(run)
    finish(info)
    return summary


def _import_training_modules() -> None:
    """Import what training uses before anything is seeded: a module imported for the first
    time may draw random numbers, which would make a process's first run differ from later ones."""
    import rich.progress  # noqa: F401
    import timm.data  # noqa: F401
    import timm.loss  # noqa: F401
    import timm.optim  # noqa: F401
    import timm.scheduler  # noqa: F401
    import timm.utils  # noqa: F401
    import torch.utils.data  # noqa: F401


def _build_run(cfg: TrainConfig, info: DistInfo, console: Any) -> _Run:
    """Data, model (seeded alike on every process), EMA, optimiser, loss: nothing is written."""
    from timm.utils import ModelEmaV3

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, val_ds = _build_data(cfg)
    num_classes = cfg.num_classes if cfg.num_classes is not None else num_classes_of(train_ds)
    _seed_everything(cfg.seed)  # the same initial weights on every process
    model, base_plan = create_model(cfg, num_classes)
    model.to(info.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
    ) if info.distributed else model
    sampler, loader, val_loader = _make_loaders(cfg, info, train_ds, val_ds)
    optimizer, scheduler, scaler = _make_optimisation(cfg, info, model, len(loader))
    mixup, loss_fn = _make_loss(cfg, num_classes)
    # Created before the RNG is (re)set: importing rich the first time draws from `random`.
    progress = _Progress(info.main and cfg.progress, console)
    return _Run(cfg, info, model, net, base_plan, ema, optimizer, scheduler, scaler, mixup, loss_fn,
                sampler, loader, val_loader, num_classes, progress)


def _read_resume_checkpoint(run: _Run, resume: str) -> Any:
    """The newest complete checkpoint of ``resume``, checked to fit ``run``; a missing or damaged
    file is one line naming it and what to do. Reads only."""
    ckpt_dir = os.path.join(resume, "checkpoints")
    path = find_checkpoint(os.path.join(ckpt_dir, "last"))
    fresh = f"restore it, or start a new run from these weights with --finetune {resume}"
    if path is None:
        raise ConfigError(f"cannot resume {resume!r}: no checkpoint in {ckpt_dir!r}; {fresh}")
    try:
        ckpt = load_checkpoint(path)
    except CheckpointError as e:
        raise ConfigError(f"cannot resume {resume!r}: {e}; {fresh}") from None
    for key in ("epoch", "step"):
        if not isinstance(ckpt.meta.get(key), int) or isinstance(ckpt.meta.get(key), bool):
            raise ConfigError(f"cannot resume {resume!r}: {path}/meta.json has no valid {key!r}; {fresh}")
    lacking = [k for k in ("optimizer", "scheduler", "rng") if k not in ckpt.state]
    if lacking:
        raise ConfigError(f"cannot resume {resume!r}: {path}/state.pt is missing or lacks {lacking} "
                          f"(needed to continue exactly); {fresh}")
    misfit = misfit_summary(ckpt.model, run.model.state_dict())
    if misfit:
        raise ConfigError(f"cannot resume {resume!r}: {path}/model.safetensors does not fit the model of "
                          f"its config.yaml ({misfit}); restore the file or the config")
    if run.ema is not None and ckpt.ema is None:
        raise ConfigError(f"run {resume!r} was trained without EMA; cannot resume with ema=true")
    _load_states(run, ckpt, path, resume)  # the optimizer's state is checked by loading it
    return ckpt


def _restore(run: _Run, ckpt: Any) -> None:
    """Continue from ``ckpt`` (see :func:`_read_resume_checkpoint`): counters, best, RNG."""
    run.start_epoch, run.step = ckpt.meta["epoch"], ckpt.meta["step"]
    run.best_top1 = ckpt.meta.get("best_top1", -1.0)
    run.best_epoch = ckpt.meta.get("best_epoch", -1)
    run.last_row = ckpt.meta.get("metrics")
    rng = ckpt.state["rng"]
    if len(rng) == run.info.world_size:
        _set_rng_state(rng[run.info.rank])
    elif run.info.main:
        print(f"warning: run saved by {len(rng)} process(es), resumed by {run.info.world_size}: "
              "the data order continues but augmentation randomness differs", file=sys.stderr)


def _load_states(run: _Run, ckpt: Any, path: str, resume: str) -> None:
    """Weights, EMA, optimizer, scheduler and scaler from ``ckpt`` into the (not yet trained)
    run; a state that does not fit is one line naming ``state.pt``."""
    run.model.load_state_dict(ckpt.model)
    if run.ema is not None:
        run.ema.module.load_state_dict(ckpt.ema)
    try:
        run.optimizer.load_state_dict(ckpt.state["optimizer"])
        if ckpt.meta.get("config", {}).get("epochs", run.cfg.epochs) == run.cfg.epochs:
            run.scheduler.load_state_dict(ckpt.state["scheduler"])
        elif run.info.main:  # the saved state would bring back the old schedule length
            print(f"note: epochs changed to {run.cfg.epochs}; the lr schedule is rebuilt for it",
                  file=sys.stderr)
        if run.scaler is not None and ckpt.state.get("scaler"):
            run.scaler.load_state_dict(ckpt.state["scaler"])
    except (KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ConfigError(f"cannot resume {resume!r}: {path}/state.pt does not fit this run "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"restore it, or start a new run with --finetune {resume}") from None


def _open_log(run: _Run, resume: str | None) -> None:
    """Write the config and bring the log to the epochs already done (main process only)."""
    if run.info.main:
        _write_config(run.run_dir, run.cfg)
        if resume:
            _repair_log(run.log_path, run.start_epoch, run.last_row)


def _fit(run: _Run) -> dict[str, Any]:
    """Train epoch after epoch from where the run stands; save and log after each."""
    # timm's schedulers are pure functions of the epoch / update count: set the lr for them.
    run.scheduler.step(run.start_epoch)
    run.scheduler.step_update(run.step)
    summary: dict[str, Any] = {"run_dir": run.run_dir, "epochs_done": run.start_epoch, "stopped": False,
                               "rank": run.info.rank}
    for epoch in range(run.start_epoch, run.cfg.epochs):
        stats = _train_epoch(run, epoch)
        if stats is None:  # stop_after_steps: as if killed, nothing of this epoch is saved
            summary.update(stopped=True, step=run.step)
            return summary
        row = _evaluate_epoch(run, epoch, stats)
        _save_epoch(run, epoch, row)
        summary.update(epochs_done=epoch + 1, step=run.step, last=row, best_top1=run.best_top1,
                       best_epoch=run.best_epoch)
    return summary


def _train_epoch(run: _Run, epoch: int) -> dict[str, Any] | None:
    """One pass over the training data; its loss, accuracy and speed (None when stopped early)."""
    cfg = run.cfg
    run.sampler.set_epoch(epoch)
    run.net.train()
    loss_sum = correct = seen = 0.0
    keep = None
    t0 = time.perf_counter()
    run.progress.start(f"epoch {epoch + 1}/{cfg.epochs}", len(run.loader))
    for images, targets in run.loader:
        if cfg.stop_after_steps is not None and run.step >= cfg.stop_after_steps:
            run.progress.stop()
            return None
        keep = _follow_keep_rate(run, keep)
        loss, hits = _train_step(run, images, targets, epoch)
        n = images.shape[0]
        loss_sum += loss * n
        correct += hits
        seen += n
        run.progress.advance(f"loss {loss:.3f}")
    run.progress.stop()
    elapsed = time.perf_counter() - t0
    run.scheduler.step(epoch + 1)
    loss_sum, correct, seen = all_reduce_sum([loss_sum, correct, seen], run.info)
    return {"keep_rate": keep, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
            "images_per_s": seen / elapsed, "epoch_s": elapsed}


def _follow_keep_rate(run: _Run, keep: float | None) -> float | None:
    """Set the plan's keep rate of EViT's warm-up for the current step; returns it."""
    if run.base_plan is None or run.base_plan.keep_rate is None:
        return keep
    from .plan import keep_rate_warmup

    start, length = _shrink_schedule(run.cfg)
    k = keep_rate_warmup(run.step, len(run.loader), run.base_plan.keep_rate, start, length)
    if k != keep:
        run.model.imagepiece.plan = run.base_plan.with_keep_rate(k)
    return k


def _train_step(run: _Run, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[float, int]:
    """One optimiser step; returns the loss and the hits against the labels before Mixup (a
    rough but cheap training accuracy)."""
    cfg, device = run.cfg, run.info.device
    images = images.to(device, non_blocking=True)
    hard = targets.to(device, non_blocking=True)
    targets = hard
    if run.mixup is not None:
        images, targets = run.mixup(images, hard)
    with torch.autocast(device.type, enabled=run.use_amp):
        output = run.net(images)
        loss = run.loss_fn(output, targets)
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"loss is {value} at epoch {epoch}, step {run.step}; lower the "
                                 "learning rate or set clip_grad")
    run.optimizer.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(loss).backward()
        if cfg.clip_grad:
            run.scaler.unscale_(run.optimizer)
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        loss.backward()
        if cfg.clip_grad:
            nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
        run.optimizer.step()
    run.step += 1
    if run.ema is not None:
        run.ema.update(run.model, step=run.step)
    run.scheduler.step_update(run.step)
    return value, int((output.detach().argmax(-1) == hard).sum().item())


def _evaluate_epoch(run: _Run, epoch: int, stats: Mapping[str, Any]) -> dict[str, Any]:
    """The epoch's log line: training statistics and validation of the model (and its EMA)
    under the plan that will be deployed."""
    if run.base_plan is not None:
        run.model.imagepiece.plan = run.base_plan
    info = run.info
    val = evaluate_model(run.model, run.val_loader, info.device, run.use_amp, info.world_size)
    row = {"epoch": epoch, "step": run.step, "lr": run.optimizer.param_groups[0]["lr"],
           "keep_rate": stats["keep_rate"], "train_loss": stats["train_loss"],
           "train_top1": stats["train_top1"], "val_loss": val["loss"], "val_top1": val["top1"],
           "val_top5": val["top5"], "images_per_s": stats["images_per_s"], "epoch_s": stats["epoch_s"]}
    if run.ema is not None:
        ema_val = evaluate_model(run.ema.module, run.val_loader, info.device, run.use_amp, info.world_size)
        row.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
    return row


def _save_epoch(run: _Run, epoch: int, row: dict[str, Any]) -> None:
    """Checkpoints and log line of a finished epoch, ordered so a kill at any moment loses
    nothing: ``best`` is written before ``last``, whose metadata names it (a kill in between
    redoes the epoch, bit-identically, and writes ``best`` again), and ``last`` carries the log
    line, which a resumed run restores when the kill came before the line was written."""
    info = run.info
    is_best = row["val_top1"] > run.best_top1
    if is_best:
        run.best_top1, run.best_epoch = row["val_top1"], epoch
    rngs: list[Any] = [None] * info.world_size
    if info.distributed:
        dist.all_gather_object(rngs, _rng_state())
    else:
        rngs = [_rng_state()]
    cfg = run.cfg
    meta = {"epoch": epoch + 1, "step": run.step, "best_top1": run.best_top1, "best_epoch": run.best_epoch,
            "world_size": info.world_size, "metrics": row, "model": cfg.model, "method": cfg.method,
            "num_classes": run.num_classes, "img_size": _default_img_size(cfg), "config": cfg.to_dict()}
    if info.main:
        ema_module = run.ema.module if run.ema is not None else None
        if is_best:
            save_checkpoint(os.path.join(run.ckpt_dir, "best"), run.model, meta=meta, ema=ema_module)
            kill_point("train:after-best")
        state = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
                 "scaler": run.scaler.state_dict() if run.scaler is not None else {}, "rng": rngs}
        save_checkpoint(os.path.join(run.ckpt_dir, "last"), run.model, meta=meta, state=state, ema=ema_module)
        kill_point("train:after-last")
        with open(run.log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        run.progress.print(row)
    if info.distributed:
        dist.barrier()


def resume_config(run_dir: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. more epochs) applied.

    Overrides of :data:`FIXED_ON_RESUME` (the model's settings, data kind, run folder) are
    refused: the checkpoint holds that model. Others than ``epochs``, ``workers``, ``progress``
    and ``stop_after_steps`` change the run, so the continuation is no longer the uninterrupted run.
    """
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"cannot resume {run_dir!r}: no config.yaml (not a run directory?)")
    try:
        with open(path) as f:
            saved = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict):
        raise ConfigError(f"cannot resume {run_dir!r}: {path} is damaged (not a mapping of option: value); "
                          "restore it from a backup or from checkpoints/last/meta.json's 'config'")
    saved["stop_after_steps"] = None  # a debug stop belongs to one invocation, not to the run
    changed = [k for k in FIXED_ON_RESUME if k in (overrides or {}) and k in saved
               and _coerce(k, overrides[k]) != saved[k]]
    if changed:
        k = changed[0]
        raise ConfigError(f"cannot change {k} of run {run_dir!r} on --resume (saved {saved[k]!r}, given "
                          f"{overrides[k]!r}); start a new run instead (--finetune {run_dir} starts "
                          "from its weights)")
    try:
        cfg = resolve_config(overrides=overrides, base=saved)
    except ConfigError as e:
        raise ConfigError(f"cannot resume {run_dir!r} with {path}: {e}") from None
    if find_checkpoint(os.path.join(run_dir, "checkpoints", "last")) is None:
        raise ConfigError(f"cannot resume {run_dir!r}: no checkpoint yet (killed in the first epoch?); "
                          "start it again with --overwrite")
    return cfg


# --------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    """This process's RNG states in types ``torch.load(weights_only=True)`` reads back."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)



class _Progress:
    """A rich progress bar on the main process of an interactive terminal, nothing otherwise."""

    def __init__(self, enabled: bool, console: Any = None):
        from rich.console import Console
        from rich.progress import Progress  # noqa: F401  (imported here, before seeding)

        self.console = console or Console(stderr=True)
        self.enabled = enabled
        self.bar = None
        self.task = None

    def start(self, what: str, total: int) -> None:
        if self.enabled and self.console.is_terminal:
            from rich.progress import Progress

            self.bar = Progress(console=self.console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(what, total=total)

    def advance(self, text: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=text)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def print(self, row: Mapping[str, Any]) -> None:
        if self.enabled:
            keep = f" keep {row['keep_rate']:.3f}" if row.get("keep_rate") is not None else ""
            self.console.print(
                f"epoch {row['epoch']}: loss {row['train_loss']:.4f} lr {row['lr']:.2e}{keep} "
                f"train top-1 {row['train_top1']:.2f} val top-1 {row['val_top1']:.2f} "
                f"top-5 {row['val_top5']:.2f} {row['images_per_s']:.0f} img/s", highlight=False)
