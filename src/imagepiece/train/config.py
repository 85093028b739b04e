"""Training options: the :class:`TrainConfig` fields, read from YAML and ``--set``, typed,
range-checked before any work, and the saved config of a run being resumed."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..checkpoint import find_checkpoint
from ..data import DATASET_KINDS, SPLITS
from ..distributed import check_device
from ..options import OptionError, parse_bool

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
    from ..plan import parse_method

    try:
        preset, _ = parse_method(cfg.method)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    given = [f"{n}={getattr(cfg, n)!r}" for n in ("keep_rate", "r") if getattr(cfg, n) is not None]
    if preset == "none" and given:
        raise ConfigError(f"{', '.join(given)} with method='none' (no reduction) would be ignored; "
                          "choose a method, e.g. --method evit or --method tome")


def default_img_size(cfg: TrainConfig) -> int:
    if cfg.img_size is not None:
        return cfg.img_size
    return 224 if cfg.dataset == "imagefolder" else 32


def shrink_schedule(cfg: TrainConfig) -> tuple[float, float]:
    """EViT's warm-up: keep everything for 10 of 300 epochs, then shrink over 100 (scaled)."""
    start = cfg.shrink_start if cfg.shrink_start is not None else round(cfg.epochs * 10 / 300)
    length = cfg.shrink_epochs if cfg.shrink_epochs is not None else round(cfg.epochs * 100 / 300)
    return start, length


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
        best = find_checkpoint(os.path.join(run_dir, "checkpoints", "best"))
        if best is not None:  # --overwrite would delete it
            raise ConfigError(f"cannot resume {run_dir!r}: checkpoints/last is missing and checkpoints/best "
                              "alone cannot continue the run exactly; start a new run from its weights "
                              f"with --finetune {best} and another --name")
        raise ConfigError(f"cannot resume {run_dir!r}: no checkpoint yet (killed in the first epoch?); "
                          "start it again with --overwrite")
    return cfg
