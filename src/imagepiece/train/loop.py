"""The recipe, epoch after epoch: train, evaluate, save (kill-safe), log."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..checkpoint import kill_point, save_checkpoint
from ..distributed import all_reduce_sum, finish, lost_peer, setup_distributed
from ..evaluate import evaluate_model
from ..options import OptionError, check_output_dir
from .build import Run, build_run, import_training_modules
from .config import ConfigError, TrainConfig, default_img_size, shrink_schedule
from .resume import read_resume_checkpoint, restore, rng_state, seed_everything
from .run_folder import claimed, repair_log, write_config


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
    import_training_modules()
    info = setup_distributed(cfg.device)
    run = build_run(cfg, info, console)
    ckpt = read_resume_checkpoint(run, resume) if resume else None  # a damaged run: before any write
    if ckpt is not None and cfg.epochs < ckpt.meta["epoch"]:
        raise ConfigError(f"epochs={cfg.epochs} is fewer than the {ckpt.meta['epoch']} epochs run {resume!r} "
                          f"has done; give --epochs {ckpt.meta['epoch']} or more (nothing was changed)")
    try:
        with claimed(cfg, info, resume, overwrite) as run_dir:
            run.run_dir = run_dir
            if ckpt is not None:
                restore(run, ckpt)
            else:
                seed_everything(cfg.seed + info.rank)  # augmentation differs per process
            _open_log(run, resume)
            summary = _fit(run)
    except RuntimeError as e:  # a peer process gone: one line naming it, not gloo's traceback
        lost = lost_peer(e, info)
        if lost is None:
            raise
        raise lost from None
    finish(info)
    return summary


def _open_log(run: Run, resume: str | None) -> None:
    """Write the config and bring the log to the epochs already done (main process only)."""
    if run.info.main:
        write_config(run.run_dir, run.cfg)
        if resume:
            repair_log(run.log_path, run.start_epoch, run.last_row)


def _fit(run: Run) -> dict[str, Any]:
    """Train epoch after epoch from where the run stands; save and log after each."""
    # timm's schedulers are pure functions of the epoch / update count: set the lr for them.
    run.scheduler.step(run.start_epoch)
    run.scheduler.step_update(run.step)
    summary: dict[str, Any] = {"run_dir": run.run_dir, "epochs_done": run.start_epoch, "stopped": False,
                               "rank": run.info.rank, "best_top1": run.best_top1,
                               "best_epoch": run.best_epoch}
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


def _train_epoch(run: Run, epoch: int) -> dict[str, Any] | None:
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


def _follow_keep_rate(run: Run, keep: float | None) -> float | None:
    """Set the plan's keep rate of EViT's warm-up for the current step; returns it."""
    if run.base_plan is None or run.base_plan.keep_rate is None:
        return keep
    from ..plan import keep_rate_warmup

    start, length = shrink_schedule(run.cfg)
    k = keep_rate_warmup(run.step, len(run.loader), run.base_plan.keep_rate, start, length)
    if k != keep:
        run.model.imagepiece.plan = run.base_plan.with_keep_rate(k)
    return k


def _train_step(run: Run, images: torch.Tensor, targets: torch.Tensor, epoch: int) -> tuple[float, int]:
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


def _evaluate_epoch(run: Run, epoch: int, stats: Mapping[str, Any]) -> dict[str, Any]:
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


def _save_epoch(run: Run, epoch: int, row: dict[str, Any]) -> None:
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
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    cfg = run.cfg
    meta = {"epoch": epoch + 1, "step": run.step, "best_top1": run.best_top1, "best_epoch": run.best_epoch,
            "world_size": info.world_size, "metrics": row, "model": cfg.model, "method": cfg.method,
            "num_classes": run.num_classes, "img_size": default_img_size(cfg), "config": cfg.to_dict()}
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
