"""What a run is made of, built before anything is written: model (with its plan and
fine-tuning weights), data, loaders, optimiser, scheduler, loss, and the :class:`Run` holding them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..checkpoint import load_weights
from ..data import DataError, TransformConfig, build_dataset, num_classes_of
from ..distributed import DistInfo
from ..evaluate import make_eval_loader
from .config import ConfigError, TrainConfig, default_img_size
from .resume import seed_everything


def create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, Any]:
    """The timm model of ``cfg`` with its plan applied; returns (model, base plan or None).

    Any timm name works; ``imagepiece_*`` names (local coherence bias + plan) get the plan at
    creation, other names are patched unless the method is ``none``. ``finetune`` weights are
    loaded before patching (the plan does not change parameter names); a checkpoint of another
    architecture is refused, a classifier of another size only with ``finetune_new_head``.
    """
    import timm

    from .. import is_patched, patch
    from ..plan import parse_method

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
    kwargs = dict(img_size=default_img_size(cfg), num_classes=num_classes,
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


def _check_input_size(model: nn.Module, cfg: TrainConfig) -> None:
    """The model takes the data's image size (a ``model_kwargs`` img_size may say otherwise)."""
    from ..models import fixed_input_size

    size, img = fixed_input_size(model), default_img_size(cfg)
    if size is not None and size != (img, img):
        raise ConfigError(f"img_size={img} does not match the input size {size[0]}x{size[1]} the model "
                          f"{cfg.model!r} is built for (model_kwargs {cfg.model_kwargs}); give the same "
                          "size to both, or leave one out")


def _load_finetune(model: nn.Module, cfg: TrainConfig) -> None:
    """Start from ``cfg.finetune``; tensors it cannot have (a new coherence branch, a new
    classifier with ``finetune_new_head``) keep their initialisation, with a warning."""
    report = load_weights(model, cfg.finetune, use_ema=cfg.finetune_ema, strict=True, adapt=True,
                          new_head=cfg.finetune_new_head)
    if report["missing"] or report["unexpected"]:
        warnings.warn(f"fine-tuning from {cfg.finetune!r}: {len(report['missing'])} tensor(s) keep "
                      f"their initialisation {report['missing'][:8]}, "
                      f"{len(report['unexpected'])} unused {report['unexpected'][:8]}", stacklevel=3)


def _build_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """(train, val) datasets with the DeiT train / eval transforms of ``cfg``."""
    tcfg = TransformConfig(
        auto_augment=cfg.aa or None, re_prob=cfg.reprob, re_mode=cfg.remode, re_count=cfg.recount,
        color_jitter=cfg.color_jitter, hflip=cfg.hflip,
        scale=tuple(cfg.scale) if cfg.scale else None, interpolation=cfg.interpolation,
        crop_pct=cfg.crop_pct)
    common = dict(kind=cfg.dataset, root=cfg.data_root, img_size=default_img_size(cfg),
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
    folders = [getattr(ds, "root", None) for ds in (train_ds, val_ds)]
    if cfg.dataset == "imagefolder" and folders[0] == folders[1]:
        raise ConfigError(f"train and val would both read {folders[0]!r}: give --data a folder with "
                          "train/ and val/ sub-folders, so that validation never sees training images")
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


@dataclass
class Run:
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
    progress: RunProgress
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


def import_training_modules() -> None:
    """Import what training uses before anything is seeded: a module imported for the first
    time may draw random numbers, which would make a process's first run differ from later ones."""
    import rich.progress  # noqa: F401
    import timm.data  # noqa: F401
    import timm.loss  # noqa: F401
    import timm.optim  # noqa: F401
    import timm.scheduler  # noqa: F401
    import timm.utils  # noqa: F401
    import torch.utils.data  # noqa: F401


def build_run(cfg: TrainConfig, info: DistInfo, console: Any) -> Run:
    """Data, model (seeded alike on every process), EMA, optimiser, loss: nothing is written."""
    from timm.utils import ModelEmaV3

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    train_ds, val_ds = _build_data(cfg)
    num_classes = cfg.num_classes if cfg.num_classes is not None else num_classes_of(train_ds)
    seed_everything(cfg.seed)  # the same initial weights on every process
    model, base_plan = create_model(cfg, num_classes)
    _check_input_size(model, cfg)
    model.to(info.device)
    ema = ModelEmaV3(model, decay=cfg.ema_decay) if cfg.ema else None
    net = nn.parallel.DistributedDataParallel(
        model, device_ids=[info.local_rank] if info.device.type == "cuda" else None
    ) if info.distributed else model
    sampler, loader, val_loader = _make_loaders(cfg, info, train_ds, val_ds)
    optimizer, scheduler, scaler = _make_optimisation(cfg, info, model, len(loader))
    mixup, loss_fn = _make_loss(cfg, num_classes)
    # Created before the RNG is (re)set: importing rich the first time draws from `random`.
    progress = RunProgress(info.main and cfg.progress, console)
    return Run(cfg, info, model, net, base_plan, ema, optimizer, scheduler, scaler, mixup, loss_fn,
                sampler, loader, val_loader, num_classes, progress)


class RunProgress:
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
