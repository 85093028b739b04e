"""``imagepiece train``: the DeiT recipe from timm's pieces, on one process or under torchrun.

Defaults are DeiT's (RandAugment m9, Mixup 0.8 / CutMix 1.0, label smoothing 0.1, random
erasing 0.25, AdamW lr 5e-4 x global batch / 512, weight decay 0.05, cosine with 5 warm-up
epochs, drop path 0.1) and EViT's keep-rate warm-up (SPEC §4.4). Every default is a field of
:class:`TrainConfig`, overridable from a YAML file and the command line; the resolved config is
saved in the run directory. A checkpoint is written after every epoch, and ``resume`` restores
model, optimizer, scheduler, EMA, AMP scaler, step counters and every process's RNG state, so a
killed run continues with the same data order and ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .checkpoint import load_checkpoint, load_weights, save_checkpoint
from .data import DataError, TransformConfig, build_dataset, num_classes_of
from .evaluate import evaluate_model, make_eval_loader

__all__ = ["ConfigError", "DistInfo", "TrainConfig", "create_model", "resolve_config", "train"]


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


def resolve_config(config_file: str | None = None, overrides: Mapping[str, Any] | None = None,
                   base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Defaults, then ``base`` (a saved run's config), then the YAML file, then ``overrides``."""
    import yaml

    values: dict[str, Any] = dict(base or {})
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file {config_file!r} does not exist")
        try:
            with open(config_file) as f:
                loaded = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {config_file!r} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {config_file!r} must hold a mapping of option: value")
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update(overrides or {})
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown training option(s) {unknown}; allowed: {', '.join(_FIELDS)}")
    for key, value in values.items():
        values[key] = _coerce(key, value)
    cfg = TrainConfig(**values)
    _validate(cfg)
    return cfg


def _coerce(key: str, value: Any) -> Any:
    """Numbers YAML reads as strings (``1e-6`` needs a dot in YAML 1.1) for numeric options."""
    kind = str(_FIELDS[key].type)
    if isinstance(value, str) and ("float" in kind or "int" in kind):
        for cast in ((int, float) if "int" in kind else (float,)):
            try:
                return cast(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}={value!r} is not a number")
    return value


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
        out[key] = yaml.safe_load(value) if value.strip() else None
    return out


def _validate(cfg: TrainConfig) -> None:
    def positive(name: str, low: float = 1) -> None:
        value = getattr(cfg, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"{name}={value!r} must be a number >= {low}")

    for name in ("epochs", "batch_size", "lr_base_batch"):
        positive(name)
    for name in ("workers", "warmup_epochs", "cooldown_epochs", "seed", "recount"):
        positive(name, 0)
    for name in ("base_lr", "weight_decay", "mixup", "cutmix", "smoothing", "drop_path", "reprob"):
        positive(name, 0)
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"lr={cfg.lr!r} must be > 0")
    if not 0 <= cfg.smoothing < 1:
        raise ConfigError(f"smoothing={cfg.smoothing!r} must be in [0, 1)")
    if cfg.keep_rate is not None and not 0 < cfg.keep_rate <= 1:
        raise ConfigError(f"keep_rate={cfg.keep_rate!r} must be in (0, 1]")
    for name in ("shrink_start", "shrink_epochs"):
        value = getattr(cfg, name)
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if value is not None and (not number or value < 0):
            raise ConfigError(f"{name}={value!r} must be a non-negative number of epochs or null")
    for name in ("stop_after_steps", "img_size", "num_classes", "threads"):
        value = getattr(cfg, name)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise ConfigError(f"{name}={value!r} must be a non-negative integer or null")
    if cfg.mixup_mode not in ("batch", "pair", "elem"):
        raise ConfigError(f"mixup_mode={cfg.mixup_mode!r}; allowed: batch, pair, elem")
    if (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.batch_size % 2:
        raise ConfigError(f"batch_size={cfg.batch_size} must be even with Mixup/CutMix (timm pairs "
                          "each image with the batch reversed); set mixup=0 and cutmix=0 otherwise")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device={cfg.device!r}; allowed: auto, cpu, cuda")
    if not isinstance(cfg.model_kwargs, dict):
        raise ConfigError(f"model_kwargs={cfg.model_kwargs!r} must be a mapping")


# --------------------------------------------------------------------------------------
# Processes and RNG
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the torchrun process group when there is one (nccl on GPU, gloo on CPU)."""
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use device=cpu")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local, dev)


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


# --------------------------------------------------------------------------------------
# Model, data, optimisation
# --------------------------------------------------------------------------------------


def _default_img_size(cfg: TrainConfig) -> int:
    return cfg.img_size or (224 if cfg.dataset == "imagefolder" else 32)


def create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """The timm model of ``cfg`` with its plan applied; returns (model, base plan or None).

    Any timm name works; ``imagepiece_*`` names (local coherence bias + plan) get the plan at
    creation, other names are patched unless the method is ``none``. ``finetune`` weights are
    loaded before patching (the plan does not change parameter names).
    """
    import timm

    from . import is_patched, patch
    from .bench import parse_method

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
    except (TypeError, ValueError) as e:
        raise ConfigError(f"cannot create {cfg.model!r} with {kwargs}: {e}") from None
    except Exception as e:  # noqa: BLE001  (hub downloads fail in many ways)
        if cfg.pretrained:
            raise ConfigError(f"cannot load timm's pretrained weights for {cfg.model!r} (offline?): "
                              f"{type(e).__name__}: {e}; use --finetune FILE instead") from None
        raise
    if cfg.finetune:
        report = load_weights(model, cfg.finetune, use_ema=cfg.finetune_ema)
        if report["missing"] or report["unexpected"]:
            # Expected for a new head or an added coherence branch; anything else is worth a look.
            warnings.warn(f"fine-tuning from {cfg.finetune!r}: {len(report['missing'])} tensor(s) keep "
                          f"their initialisation {report['missing'][:8]}, "
                          f"{len(report['unexpected'])} unused {report['unexpected'][:8]}", stacklevel=2)
    if not own_plan and preset != "none":
        try:
            patch(model, preset, **knobs)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"method {cfg.method!r} (knobs {knobs}): {e}") from None
    return model, (model.imagepiece.plan if is_patched(model) else None)


def _shrink_schedule(cfg: TrainConfig) -> tuple[float, float]:
    """EViT's warm-up: keep everything for 10 of 300 epochs, then shrink over 100 (scaled)."""
    start = cfg.shrink_start if cfg.shrink_start is not None else round(cfg.epochs * 10 / 300)
    length = cfg.shrink_epochs if cfg.shrink_epochs is not None else round(cfg.epochs * 100 / 300)
    return start, length


def _build_data(cfg: TrainConfig, info: DistInfo):
    tcfg = TransformConfig(
        auto_augment=cfg.aa or None, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        color_jitter=cfg.color_jitter, hflip=cfg.hflip,
        scale=tuple(cfg.scale) if cfg.scale else None, interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct)
    common = dict(kind=cfg.dataset, root=cfg.data_root, img_size=_default_img_size(cfg),
                  transform_cfg=tcfg, strict=cfg.strict_data, num_classes=cfg.num_classes or 10,
                  length=cfg.data_length, seed=cfg.seed)
    train_ds = build_dataset(split=cfg.train_split, train_transform=True, **common)
    class_to_idx = getattr(train_ds, "class_to_idx", None)
    val_ds = build_dataset(split=cfg.val_split, train_transform=False, class_to_idx=class_to_idx, **common)
    return train_ds, val_ds


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _all_reduce(values: list[float], info: DistInfo) -> list[float]:
    if not info.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.tolist()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def _run_dir(cfg: TrainConfig) -> str:
    name = cfg.name or f"{cfg.model}-{cfg.method.replace(':', '_')}-{time.strftime('%Y%m%d-%H%M%S')}"
    return os.path.join(cfg.output, name)


def _write_config(run_dir: str, cfg: TrainConfig) -> None:
    import yaml

    os.makedirs(run_dir, exist_ok=True)
    tmp = os.path.join(run_dir, ".config.yaml.tmp")
    with open(tmp, "w") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
    os.replace(tmp, os.path.join(run_dir, "config.yaml"))


def _truncate_log(path: str, before_epoch: int) -> None:
    """Keep the log lines of epochs a resumed run will not redo."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["epoch"] < before_epoch]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def train(cfg: TrainConfig, resume: str | None = None, console: Any = None) -> dict[str, Any]:
    """Train ``cfg`` (or continue the run in directory ``resume``); returns the final summary.

    ``cfg`` of a resumed run should be its saved config (see :func:`resume_config`).
    """
    from timm.data import Mixup
    from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2
    from timm.utils import ModelEmaV3
    from torch.utils.data import DataLoader, DistributedSampler

    info = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    run_dir = resume or _run_dir(cfg)
    train_ds, val_ds = _build_data(cfg, info)
    num_classes = cfg.num_classes or num_classes_of(train_ds)
    # Seed after the imports above: a module imported for the first time may draw random
    # numbers, which would make the first run of a process differ from later ones.
    _seed_everything(cfg.seed)  # the same initial weights on every process
    model, base_plan = create_model(cfg, num_classes)
    model.to(info.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
    ) if info.distributed else model

    global_batch = cfg.batch_size * info.world_size
    lr = cfg.lr or cfg.base_lr * global_batch / cfg.lr_base_batch
    extra = {"momentum": cfg.momentum} if cfg.opt in ("sgd", "momentum", "nesterov") else {}
    optimizer = create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay,
                                    eps=cfg.opt_eps, **extra)
    # One sampler for one or many processes: the order depends only on (seed, epoch), which is
    # what makes a resumed run read the same batches.
    sampler = DistributedSampler(train_ds, num_replicas=info.world_size, rank=info.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    # More loader processes than CPUs only compete with the model for them (and torch warns).
    workers = min(cfg.workers, os.cpu_count() or 1)
    loader = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=sampler, num_workers=workers,
                        drop_last=True, pin_memory=info.device.type == "cuda")
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise DataError(f"the training set has {len(train_ds)} images, fewer than one batch of "
                        f"{cfg.batch_size} x {info.world_size} processes")
    val_loader = make_eval_loader(val_ds, cfg.batch_size, workers, info.rank, info.world_size,
                                  info.device.type == "cuda")
    scheduler, _ = create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        step_on_epochs=cfg.sched_on_epochs, updates_per_epoch=steps_per_epoch)
    mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                  switch_prob=cfg.mixup_switch_prob, mode=cfg.mixup_mode,
                  label_smoothing=cfg.smoothing, num_classes=num_classes) \
        if cfg.mixup > 0 or cfg.cutmix > 0 else None
    if mixup is not None:
        loss_fn: nn.Module = SoftTargetCrossEntropy()  # Mixup already smooths the targets
    elif cfg.smoothing > 0:
        loss_fn = LabelSmoothingCrossEntropy(cfg.smoothing)
    else:
        loss_fn = nn.CrossEntropyLoss()
    use_amp = cfg.amp and info.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if use_amp else None
    shrink_start, shrink_epochs = _shrink_schedule(cfg)

    # Created before the RNG is (re)set: importing rich the first time draws from `random`.
    progress = _Progress(info.main and cfg.progress, console)
    start_epoch, step, best_top1, best_epoch = 0, 0, -1.0, -1
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    log_path = os.path.join(run_dir, "log.jsonl")
    if resume:
        ckpt = load_checkpoint(os.path.join(ckpt_dir, "last"))
        model.load_state_dict(ckpt.model)
        if ema is not None:
            if ckpt.ema is None:
                raise ConfigError(f"run {resume!r} was trained without EMA; cannot resume with ema=true")
            ema.module.load_state_dict(ckpt.ema)
        optimizer.load_state_dict(ckpt.state["optimizer"])
        if ckpt.meta.get("config", {}).get("epochs", cfg.epochs) == cfg.epochs:
            scheduler.load_state_dict(ckpt.state["scheduler"])
        elif info.main:  # the saved state would bring back the old schedule length
            print(f"note: epochs changed to {cfg.epochs}; the lr schedule is rebuilt for it",
                  file=sys.stderr)
        if scaler is not None and ckpt.state.get("scaler"):
            scaler.load_state_dict(ckpt.state["scaler"])
        start_epoch, step = ckpt.meta["epoch"], ckpt.meta["step"]
        best_top1, best_epoch = ckpt.meta.get("best_top1", -1.0), ckpt.meta.get("best_epoch", -1)
        rng = ckpt.state.get("rng", [])
        if len(rng) == info.world_size:
            _set_rng_state(rng[info.rank])
        elif info.main:
            print(f"warning: run saved by {len(rng)} process(es), resumed by {info.world_size}: "
                  "the data order continues but augmentation randomness differs", file=sys.stderr)
    else:
        _seed_everything(cfg.seed + info.rank)  # augmentation differs per process
    if info.main:
        _write_config(run_dir, cfg)
        if resume:
            _truncate_log(log_path, start_epoch)
    # timm's schedulers are pure functions of the epoch / update count: set the lr for them.
    scheduler.step(start_epoch)
    scheduler.step_update(step)

    summary: dict[str, Any] = {"run_dir": run_dir, "epochs_done": start_epoch, "stopped": False,
                               "rank": info.rank}
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        net.train()
        loss_sum = correct = seen = 0.0
        keep = None
        t0 = time.perf_counter()
        progress.start(f"epoch {epoch + 1}/{cfg.epochs}", steps_per_epoch)
        for images, targets in loader:
            if cfg.stop_after_steps is not None and step >= cfg.stop_after_steps:
                progress.stop()
                summary.update(stopped=True, step=step)
                _finish(info)
                return summary  # as if killed: nothing of this epoch is saved
            if base_plan is not None and base_plan.keep_rate is not None:
                from .plan import keep_rate_warmup

                k = keep_rate_warmup(step, steps_per_epoch, base_plan.keep_rate, shrink_start, shrink_epochs)
                if k != keep:
                    model.imagepiece.plan = base_plan.with_keep_rate(k)
                    keep = k
            images = images.to(info.device, non_blocking=True)
            targets = targets.to(info.device, non_blocking=True)
            hard = targets
            if mixup is not None:
                images, targets = mixup(images, targets)
            with torch.autocast(info.device.type, enabled=use_amp):
                output = net(images)
                loss = loss_fn(output, targets)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(f"loss is {loss.item()} at epoch {epoch}, step {step}; lower the "
                                         "learning rate or set clip_grad")
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                if cfg.clip_grad:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                if cfg.clip_grad:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
                optimizer.step()
            step += 1
            if ema is not None:
                ema.update(model, step=step)
            scheduler.step_update(step)
            n = images.shape[0]
            loss_sum += loss.item() * n
            # Against the labels before Mixup: a rough but cheap training accuracy.
            correct += (output.detach().argmax(-1) == hard).sum().item()
            seen += n
            progress.advance(f"loss {loss.item():.3f}")
        progress.stop()
        elapsed = time.perf_counter() - t0
        scheduler.step(epoch + 1)
        loss_sum, correct, seen = _all_reduce([loss_sum, correct, seen], info)
        if base_plan is not None:
            model.imagepiece.plan = base_plan  # evaluate what will be deployed
        val = evaluate_model(model, val_loader, info.device, use_amp, info.world_size)
        row = {"epoch": epoch, "step": step, "lr": optimizer.param_groups[0]["lr"],
               "keep_rate": keep, "train_loss": loss_sum / seen, "train_top1": 100 * correct / seen,
               "val_loss": val["loss"], "val_top1": val["top1"], "val_top5": val["top5"],
               "images_per_s": seen / elapsed, "epoch_s": elapsed}
        if ema is not None:
            ema_val = evaluate_model(ema.module, val_loader, info.device, use_amp, info.world_size)
            row.update(ema_val_top1=ema_val["top1"], ema_val_top5=ema_val["top5"])
        is_best = val["top1"] > best_top1
        if is_best:
            best_top1, best_epoch = val["top1"], epoch
        rngs = [None] * info.world_size
        if info.distributed:
            dist.all_gather_object(rngs, _rng_state())
        else:
            rngs = [_rng_state()]
        meta = {"epoch": epoch + 1, "step": step, "best_top1": best_top1, "best_epoch": best_epoch,
                "world_size": info.world_size, "metrics": row, "model": cfg.model, "method": cfg.method,
                "num_classes": num_classes, "img_size": _default_img_size(cfg), "config": cfg.to_dict()}
        if info.main:
            state = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                     "scaler": scaler.state_dict() if scaler is not None else {}, "rng": rngs}
            ema_module = ema.module if ema is not None else None
            save_checkpoint(os.path.join(ckpt_dir, "last"), model, meta=meta, state=state, ema=ema_module)
            if is_best:
                save_checkpoint(os.path.join(ckpt_dir, "best"), model, meta=meta, ema=ema_module)
            # The log line after the checkpoint: a crash in between only loses a line the
            # resumed run writes again.
            with open(log_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            progress.print(row)
        if info.distributed:
            dist.barrier()
        summary.update(epochs_done=epoch + 1, step=step, last=row, best_top1=best_top1, best_epoch=best_epoch)
    _finish(info)
    return summary


def _finish(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resume_config(run_dir: str, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (e.g. more epochs) applied.

    Overrides other than ``epochs``, ``workers``, ``progress`` and ``stop_after_steps`` change
    the run, so the continuation is no longer the uninterrupted run.
    """
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"cannot resume {run_dir!r}: no config.yaml (not a run directory?)")
    with open(path) as f:
        saved = yaml.safe_load(f)
    saved["stop_after_steps"] = None  # a debug stop belongs to one invocation, not to the run
    cfg = resolve_config(overrides=overrides, base=saved)
    if not os.path.isdir(os.path.join(run_dir, "checkpoints", "last")):
        raise ConfigError(f"cannot resume {run_dir!r}: no checkpoint yet (killed in the first epoch?); "
                          "start it again instead")
    return cfg


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
