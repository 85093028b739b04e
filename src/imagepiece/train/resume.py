"""Continuing a run exactly: its last checkpoint read and checked, model, optimiser,
scheduler, scaler, counters and every process's RNG state restored."""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..checkpoint import CheckpointError, find_checkpoint, load_checkpoint, misfit_summary
from .config import ConfigError

if TYPE_CHECKING:
    from .build import Run


def read_resume_checkpoint(run: Run, resume: str) -> Any:
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


def restore(run: Run, ckpt: Any) -> None:
    """Continue from ``ckpt`` (see :func:`read_resume_checkpoint`): counters, best, RNG."""
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


def _load_states(run: Run, ckpt: Any, path: str, resume: str) -> None:
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


def rng_state() -> dict[str, Any]:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
