"""One training run (new, resumed after a kill, or reused) and one evaluation, each through the
package's own entry points (``imagepiece.train``, ``imagepiece.evaluate``, ``imagepiece.bench``),
so every number is what ``imagepiece train`` / ``imagepiece eval`` give a user.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import yaml

from imagepiece import train as T
from imagepiece.checkpoint import (
    load_checkpoint,
    load_state_dict,
    load_weights,
    run_meta,
    run_weights_metadata,
    save_weights,
)
from imagepiece.data import build_dataset
from imagepiece.evaluate import evaluate_model, make_eval_loader
from imagepiece.measure import count_gmacs
from imagepiece.patch import use_method
from imagepiece.preprocess import from_run
from imagepiece.train.run_folder import LOCK_FILE

from .config import StudyConfig
from .paired import correct_vector, pack, unpack
from .registry import BASELINE, Run, slug
from .store import Layout, cached, key_of, write_json, write_text

# Options that say where or how fast a run goes, not what it trains: left out of its key.
VOLATILE = ("data_root", "workers", "threads", "device", "output", "name", "progress", "stop_after_steps")


@dataclass
class Context:
    cfg: StudyConfig
    layout: Layout
    data: str  # folder of the Fashion-MNIST IDX files
    progress: bool = False
    _datasets: dict[str, Any] = field(default_factory=dict)

    def dataset(self, split: str) -> Any:
        if split not in self._datasets:
            self._datasets[split] = build_dataset("fashion-mnist", self.data, split, self.cfg.img_size,
                                                  train_transform=False)
        return self._datasets[split]


# ------------------------------------------------------------------------------ training


def train_values(ctx: Context, run: Run) -> dict[str, Any]:
    """The ``imagepiece train`` options of ``run`` (a TrainConfig as a dict)."""
    cfg = ctx.cfg
    kwargs = dict(cfg.model_kwargs, **({"coherence": run.coherence} if run.coherence else {}))
    values: dict[str, Any] = dict(
        model=run.model, model_kwargs=kwargs, method=run.method, seed=run.seed, dataset="fashion-mnist",
        data_root=ctx.data, img_size=cfg.img_size, batch_size=cfg.batch_size, workers=cfg.workers,
        threads=cfg.threads, device=cfg.device, output=ctx.layout.runs, name=run.name, progress=ctx.progress,
        **cfg.recipe_values(),
    )
    if run.scratch:  # the stem run keeps EViT's scaled warm-up (10 and 100 of 300 epochs)
        epochs = cfg.stem_epochs if run.coherence == "stem" or run.stage == "scratch" else cfg.base_epochs
        values.update(epochs=epochs, lr=cfg.base_lr, warmup_epochs=cfg.warmup_epochs)
    else:  # keep rate 1 -> target over the first third (EViT's 100 of 300 epochs), docs/methods.md
        values.update(finetune=ctx.layout.weights(BASELINE), epochs=cfg.ft_epochs, lr=cfg.ft_lr,
                      warmup_epochs=0, shrink_start=0, shrink_epochs=round(cfg.ft_epochs / 3, 4))
    return values


def train_key(ctx: Context, run: Run, baseline_key: str | None) -> str:
    """What ``run`` trains: its options (not where they live) and, for a fine-tune, its baseline's key."""
    what = {k: v for k, v in train_values(ctx, run).items() if k not in VOLATILE + ("finetune",)}
    return key_of({"train": what, "baseline": None if run.scratch else baseline_key})


def epochs_done(run_dir: str) -> int:
    try:
        meta = load_checkpoint(os.path.join(run_dir, "checkpoints", "last"), with_state=False).meta
        return int(meta["epoch"])
    except (ValueError, OSError, KeyError, TypeError):
        return 0


def _same_config(run_dir: str, values: dict[str, Any]) -> bool:
    """Whether the run folder was started with these options (volatile ones aside)."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            saved = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    want = T.resolve_config(None, values).to_dict()
    return isinstance(saved, dict) and all(saved.get(k) == v for k, v in want.items() if k not in VOLATILE)


def train_run(ctx: Context, run: Run, key: str, fresh: bool = False) -> dict[str, Any]:
    """Train ``run`` to the end: a new run, the continuation of a killed one (same options), or
    nothing when its folder already holds the finished run. Returns the run's result file."""
    values = train_values(ctx, run)
    cfg = T.resolve_config(None, values)
    run_dir = ctx.layout.run_dir(run.name)
    write_text(ctx.layout.run_config(run.name), yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if not fresh:
        restore_partial(ctx, run.name)
    done = epochs_done(run_dir) if not fresh and _same_config(run_dir, values) else 0
    t0 = time.time()
    if done == 0:
        T.train(cfg, overwrite=True)
    elif done < cfg.epochs:
        T.train(T.resume_config(run_dir, {"workers": cfg.workers, "progress": cfg.progress}), resume=run_dir)
    weights = ctx.layout.weights(run.name)
    best = os.path.join(run_dir, "checkpoints", "best")
    # the file keeps the run's meta, so `imagepiece eval --checkpoint FILE` prepares its inputs
    save_weights(weights, load_state_dict(best), metadata=run_weights_metadata(run_meta(best)))
    result = _run_result(run, run_dir, key, values, ctx.layout.run_config(run.name), done, time.time() - t0)
    return dict(result, weights=weights, weights_sha256=_sha256(weights))


def save_partial(ctx: Context, run: str) -> int:
    """Copy an unfinished run's folder (its lock aside) into the results (``Layout.partial``) so
    that a fresh clone continues it; returns the epochs it holds (0: nothing to keep, nothing
    written). The copy must hold the epoch the run held when the copy began (a checkpoint saved
    meanwhile is refused) before it replaces an older one."""
    src, dst = ctx.layout.run_dir(run), ctx.layout.partial(run)
    done = epochs_done(src)
    if done == 0:
        return 0
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # our own leftover from an interrupted copy
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns(LOCK_FILE))  # the lock is the live run's
    if epochs_done(tmp) != done:
        shutil.rmtree(tmp)
        raise RuntimeError(f"{src}: its checkpoint changed while being copied; stop the run and save again")
    if os.path.isdir(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)
    return done


def restore_partial(ctx: Context, run: str) -> bool:
    """Put a saved partial run back as the run's folder when the folder has no checkpoint and
    the copy holds more epochs (a fresh clone, or another machine); True when it did."""
    src, dst = ctx.layout.partial(run), ctx.layout.run_dir(run)
    if not os.path.isdir(src) or epochs_done(src) <= epochs_done(dst):
        return False
    if os.path.isdir(dst) and os.listdir(dst):
        raise RuntimeError(f"{dst} holds another, shorter copy of {run}: move it away to continue from "
                           f"{src}")
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return True


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _run_result(run: Run, run_dir: str, key: str, values: dict[str, Any], config_path: str,
                resumed_from: int, wall_s: float) -> dict[str, Any]:
    best = load_checkpoint(os.path.join(run_dir, "checkpoints", "best"), with_state=False).meta
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f if line.strip()]
    return {"key": key, "run": asdict(run), "config": values, "run_dir": run_dir,
            "epochs": len(log), "best_epoch": best.get("best_epoch"), "val_top1": best.get("best_top1"),
            "resumed_from": resumed_from, "train_minutes": sum(r.get("epoch_s", 0) for r in log) / 60,
            "wall_minutes_this_call": wall_s / 60, "log": log,
            "command": f"imagepiece train --config {config_path} --overwrite"}


# ------------------------------------------------------------------------------ evaluation


def model_kwargs(ctx: Context, run: Run) -> dict[str, Any]:
    kwargs = dict(ctx.cfg.model_kwargs, img_size=ctx.cfg.img_size, num_classes=10)
    if run.coherence:
        kwargs["coherence"] = run.coherence
    return kwargs


def load_run_model(ctx: Context, run: Run) -> torch.nn.Module:
    """``run``'s best weights (by validation top-1) in a model of its architecture, no plan."""
    import timm

    kwargs = model_kwargs(ctx, run)
    if run.model.startswith("imagepiece_"):
        kwargs["plan"] = "none"
    model = timm.create_model(run.model, **kwargs)
    load_weights(model, ctx.layout.weights(run.name), strict=True, adapt=False)
    return model.eval()


def under(model: torch.nn.Module, run: Run, spec: str) -> torch.nn.Module:
    return use_method(model, spec, registered=run.model.startswith("imagepiece_"))


def eval_key(run_key: str, spec: str) -> str:
    return key_of({"eval": spec, "run": run_key})


def evaluate(ctx: Context, run: Run, spec: str, key: str) -> dict[str, Any]:
    """Validation and test top-1/top-5/loss, GMACs and token counts of ``run`` under ``spec``."""
    cfg = ctx.cfg
    model = under(load_run_model(ctx, run), run, spec)
    x = torch.randn(1, 3, cfg.img_size, cfg.img_size)
    gmacs = count_gmacs(model, x)
    ctl = getattr(model, "imagepiece", None)
    tokens = ctl.token_counts(model.patch_embed.num_patches + 1) if ctl is not None else None
    model.to(cfg.device)
    out: dict[str, Any] = {"key": key, "run": run.name, "spec": spec, "gmacs": gmacs, "tokens": tokens}
    for split in ("val", "test"):
        loader = make_eval_loader(ctx.dataset(split), cfg.eval_batch)
        res = evaluate_model(model, loader, cfg.device)
        out.update({f"{split}_{k}": res[k] for k in ("top1", "top5", "loss", "images")})
    out["command"] = eval_command(ctx, run, spec)
    return out


def eval_command(ctx: Context, run: Run, spec: str) -> str:
    """The ``imagepiece eval`` line that reproduces a row's test top-1 on a fresh clone: no
    ``--data``, so the Debian package's test split serves when installed, else the package's copy
    (the same 10,000 images). The run's eval transform (Fashion-MNIST's mean/std, crop,
    interpolation) is given explicitly: weights files written before they kept their run's meta
    carry no record of it, and without it ``eval`` would use the architecture's timm
    ``pretrained_cfg``."""
    args = " ".join(f"--model-arg {k}={v}" for k, v in model_kwargs(ctx, run).items() if k != "img_size")
    prep = from_run({"config": train_values(ctx, run)})
    norm = (f"--mean {','.join(f'{v:g}' for v in prep.mean)} --std {','.join(f'{v:g}' for v in prep.std)} "
            f"--crop-pct {prep.crop_pct:g} --interpolation {prep.interpolation}")
    return (f"imagepiece eval --model {run.model} {args} --checkpoint {ctx.layout.weights(run.name)} "
            f"--dataset fashion-mnist --split test --img-size {ctx.cfg.img_size} {norm} --method '{spec}'")


def correct(ctx: Context, run: Run, spec: str, key: str, test_top1: float) -> np.ndarray:
    """Per-image top-1 correctness on the test split of ``run`` under ``spec`` (cached beside its
    evaluation, same key), for the paired comparisons; checked against the evaluation's top-1."""
    path = ctx.layout.file(f"correct/{run.name}/{slug(spec)}.json")
    found = cached(path, key)
    if found is None:
        model = under(load_run_model(ctx, run), run, spec)
        v = correct_vector(model, make_eval_loader(ctx.dataset("test"), ctx.cfg.eval_batch))
        found = {"key": key, "images": len(v), "top1": 100 * float(v.mean()), "bits": pack(v)}
        write_json(path, found)
    if abs(found["top1"] - test_top1) > 0.015:
        raise RuntimeError(f"{path}: top-1 {found['top1']:.2f} differs from its evaluation's {test_top1:.2f}")
    return unpack(found["bits"], found["images"])


def eval_path(ctx: Context, run: str, spec: str) -> str:
    return ctx.layout.evaluation(run, slug(spec))
