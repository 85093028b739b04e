"""``imagepiece eval``: top-1, top-5, loss and images/s of one set of weights under several plans.

The same weights are patched with each plan in turn (``none`` = the unmodified model), so the
rows of one command differ only in the reduction. Runs on one process or under torchrun: each
process evaluates every ``world_size``-th image (no padding duplicates) and the sums are
all-reduced, so the numbers are exact either way.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from .loading import (
    SHIPPED_PREFIX,
    ModelLoadError,
    OpenedModel,
    check_model_name,
    comes_with_config,
    open_model,
)
from .patch import describe
from .plan import parse_method

__all__ = ["EvalConfig", "EvalError", "check_config", "evaluate_model", "evaluate_plans", "make_eval_loader",
           "render", "write_json"]


class EvalError(ValueError):
    """An evaluation option has a value that is not allowed."""


def make_eval_loader(ds: Dataset, batch_size: int, workers: int = 0, rank: int = 0, world_size: int = 1,
                     pin_memory: bool = False) -> DataLoader:
    """A loader over this process's share (every ``world_size``-th image, from ``rank``)."""
    shard = ds if world_size == 1 else Subset(ds, range(rank, len(ds), world_size))
    workers = min(workers, os.cpu_count() or 1)  # more processes than CPUs only compete for them
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)


def first_images(ds: Dataset, max_images: int | None) -> Dataset:
    """The first ``max_images`` items of ``ds`` (all of them for None)."""
    if max_images is None:
        return ds
    if max_images < 1:
        raise EvalError(f"max_images={max_images} must be >= 1")
    return Subset(ds, range(min(max_images, len(ds))))


@torch.inference_mode()
def evaluate_model(model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu",
                   amp: bool = False, world_size: int = 1) -> dict[str, float]:
    """Top-1 / top-5 (percent), mean cross-entropy and images/s over the loader, summed over
    all processes when ``world_size > 1``."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    compute = 0.0
    for images, targets in loader:
        images = images.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with torch.autocast(device.type, enabled=amp and device.type == "cuda"):
            logits = model(images)
            logits = getattr(logits, "logits", logits)  # a transformers ModelOutput
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        compute += time.perf_counter() - t0
        logits = logits.float()
        k = min(5, logits.shape[-1])
        top = logits.topk(k, dim=-1).indices
        hits = top == targets[:, None]
        sums += torch.tensor([loss_fn(logits, targets).item(), hits[:, 0].sum().item(),
                              hits.any(-1).sum().item(), len(targets)], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(sums)
        t = torch.tensor([compute], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest process bounds the throughput
        compute = t.item()
    model.train(was_training)
    loss, top1, top5, n = sums.tolist()
    if n == 0:
        raise EvalError("the evaluation set is empty")
    return {"top1": 100 * top1 / n, "top5": 100 * top5 / n, "loss": loss / n, "images": int(n),
            "images_per_s": n / compute if compute > 0 else float("nan")}


@dataclass
class EvalConfig:
    """What to evaluate: a model, its weights, the plans and the data."""

    model: str | None = None  # None: the model of a run directory given as checkpoint
    checkpoint: str | None = None  # run dir, checkpoint dir, .safetensors, .pth, .pth.tar
    use_ema: bool = False
    pretrained: bool = False
    methods: tuple[str, ...] = ("none",)
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str | None = None  # None: the run's dataset, else imagefolder
    data_root: str | None = None  # None: the run's data root
    split: str = "val"
    img_size: int | None = None
    num_classes: int | None = None
    # Preprocessing overrides (None: the model's own, see imagepiece.preprocess)
    crop_pct: float | None = None
    interpolation: str | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    batch_size: int = 64
    workers: int = 4
    data_length: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    max_images: int | None = None  # the first N images of the split
    timing_warmup: int = 2  # untimed rounds before the images/s rounds
    timing_runs: int = 5  # timed rounds, each running every plan once in a new random order


def check_config(cfg: EvalConfig) -> None:
    """Every value of ``cfg`` in its range, before any work (0 never stands for a default)."""
    from .data import DATASET_KINDS, SPLITS
    from .distributed import check_device
    from .options import check_count

    try:
        for name in ("img_size", "num_classes", "batch_size", "data_length", "max_images", "timing_runs"):
            check_count(getattr(cfg, name), name, 0 if name == "timing_runs" else 1)
        for name in ("workers", "seed", "timing_warmup"):
            check_count(getattr(cfg, name), name, 0)
        check_device(cfg.device)
        for spec in cfg.methods:
            parse_method(spec)
    except ValueError as e:
        raise EvalError(str(e)) from None
    try:  # the preprocessing overrides, before any work (the model's own values come later)
        from .preprocess import check_overrides

        check_overrides(mean=cfg.mean, std=cfg.std, crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    except ValueError as e:
        raise EvalError(str(e)) from None
    if cfg.dataset is not None and cfg.dataset not in DATASET_KINDS:
        raise EvalError(f"dataset={cfg.dataset!r} is not allowed; allowed: {', '.join(DATASET_KINDS)}")
    if cfg.split not in SPLITS:
        raise EvalError(f"split={cfg.split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    if not cfg.methods:
        raise EvalError("no method to evaluate; pass e.g. --method none --method evit")


def _first(*values: Any) -> Any:
    """The first value that is not None (0 is a value, not "unset")."""
    return next((v for v in values if v is not None), None)


def num_outputs(model: nn.Module) -> int:
    """How many class scores the model gives (one forward of a blank image); :class:`EvalError`
    for a model with no classification head (a CLIP vision tower, a feature model)."""
    from .analysis import model_device

    info = describe(model)
    with torch.inference_mode():
        out = model(torch.zeros(1, info.in_chans, *info.image_size, device=model_device(model)))
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
        raise EvalError(f"{type(model).__name__} gives no class scores ({type(out).__name__}); scoring needs "
                        "a classifier whose outputs are the data's classes")
    return logits.shape[-1]


def evaluate_plans(cfg: EvalConfig, progress: Any = None) -> dict[str, Any]:
    """Evaluate the weights of ``cfg`` under every method; returns the results and the setup.

    The images are prepared the way the model expects (:mod:`imagepiece.preprocess`: a run's
    data, a transformers folder's preprocessor config, timm's ``pretrained_cfg``; ``cfg``'s
    mean/std/crop/interpolation/size override it). Each method runs on its own copy of the same
    weights: accuracy over the whole split, then images/s timed on one batch with every plan
    interleaved in a new random order per round after untimed warm-up rounds (as ``bench``
    does), so no plan pays the one-time costs.
    """
    from .distributed import setup_distributed

    check_config(cfg)
    methods = [(spec, parse_method(spec)[0]) for spec in cfg.methods]  # every spec checked first
    joined = dist.is_available() and dist.is_initialized()
    info = setup_distributed(cfg.device)
    setup = _open_for_eval(cfg)
    loader = make_eval_loader(setup.data, cfg.batch_size, cfg.workers, info.rank, info.world_size,
                              info.device.type == "cuda")
    rows = _score_plans(cfg, setup, loader, info, progress)
    if info.distributed and not joined:
        dist.destroy_process_group()
    base_speed = rows[0]["images_per_s"] if methods[0][1] == "none" else None
    for row in rows:
        row["speedup"] = row["images_per_s"] / base_speed if base_speed else None
    return {"model": setup.name, "weights": setup.opened.weights, "dataset": setup.dataset,
            "split": cfg.split, "folder": getattr(getattr(setup.data, "dataset", setup.data), "root", None),
            "images": rows[0]["images"], "img_size": setup.prep.img_size,
            "preprocessing": setup.prep.summary(),
            "device": str(info.device), "world_size": info.world_size, "rank": info.rank,
            "config": asdict(cfg), "results": rows}


@dataclass(frozen=True)
class _EvalSetup:
    """What one ``eval`` call scores: the opened model, its preprocessing and the images."""

    name: str
    dataset: str
    opened: OpenedModel
    prep: Any
    data: Dataset
    own_plan: bool  # the model carries ImagePiece's coherence bias: it keeps it under every plan


def _open_for_eval(cfg: EvalConfig) -> _EvalSetup:
    """The model of ``cfg`` and its split, prepared the way the model expects; a model whose class
    count is not the data's is refused."""
    from .coherence import coherence_mode
    from .data import count_classes, num_classes_of

    run, name = _model_name(cfg)
    saved = run.get("config") or {}
    shipped = name.startswith(SHIPPED_PREFIX)  # trained on Fashion-MNIST: its data by default
    dataset = cfg.dataset or saved.get("dataset") or ("fashion-mnist" if shipped else "imagefolder")
    data_root = cfg.data_root or (saved.get("data_root") if dataset == saved.get("dataset") else None)
    classes = _first(cfg.num_classes, run.get("num_classes"))
    if classes is None and not _brings_weights(cfg, name):  # random weights: the data's classes
        classes = count_classes(dataset, data_root, cfg.split)
    opened = _eval_model(cfg, name, run, dataset, classes or 10)
    prep = _preprocessing(cfg, opened.model, opened.folder, run, name)
    outputs = num_outputs(opened.model)
    ds = _eval_dataset(cfg, dataset, data_root, prep, outputs)
    if num_classes_of(ds) != outputs:
        raise EvalError(f"the model has {outputs} classes but {dataset}/{cfg.split} has "
                        f"{num_classes_of(ds)}; evaluate it on data of its own classes (or give "
                        "--num-classes for random weights)")
    own_plan = name.startswith("imagepiece_") or coherence_mode(opened.model) is not None
    return _EvalSetup(name, dataset, opened, prep, first_images(ds, cfg.max_images), own_plan)


def _score_plans(cfg: EvalConfig, setup: _EvalSetup, loader: DataLoader, info: Any, progress: Any
                 ) -> list[dict[str, Any]]:
    """One row per plan: accuracy over the whole split, then images/s timed interleaved."""
    import copy

    models, rows = {}, []
    for i, spec in enumerate(cfg.methods):
        # Each plan gets its own copy of the same weights, for the interleaved timing.
        models[spec] = _under_method(copy.deepcopy(setup.opened.model), spec, setup.own_plan
                                     ).to(info.device).eval()
        result = evaluate_model(models[spec], loader, info.device, cfg.amp, info.world_size)
        result.pop("images_per_s")  # the accuracy pass is not a fair timing: see _time_plans
        rows.append({"method": spec, **result})
        if progress is not None:
            progress(i + 1, len(cfg.methods) + 1, spec)
    speeds = _time_plans(models, loader, cfg, info)
    if progress is not None:
        progress(len(cfg.methods) + 1, len(cfg.methods) + 1, "images/s")
    for row in rows:
        row["images_per_s"] = speeds.get(row["method"], float("nan"))
    return rows


def _model_name(cfg: EvalConfig) -> tuple[dict[str, Any], str]:
    """(the run's ``meta.json`` or {}, the model to evaluate), checked to exist."""

    from .checkpoint import run_meta

    run = run_meta(cfg.checkpoint)
    name = cfg.model or run.get("model")
    if not name:
        raise EvalError("no model given: pass --model NAME (a timm name, shipped:NAME or a transformers "
                        "folder), or --checkpoint RUN_DIR of an imagepiece training run (or no options at "
                        "all: the shipped models)")
    try:
        return run, check_model_name(name)
    except ModelLoadError as e:
        raise EvalError(str(e)) from None


def _brings_weights(cfg: EvalConfig, name: str) -> bool:
    """Whether the model's class count comes with it (not chosen to fit the data)."""
    return bool(cfg.checkpoint or cfg.pretrained or comes_with_config(name))


def _preprocessing(cfg: EvalConfig, model: nn.Module, folder: str | None, run: dict[str, Any],
                   name: str) -> Any:
    """The model's own preprocessing, with ``cfg``'s values overriding it."""
    from .preprocess import resolve_preprocessing

    source = f"the card of {name}" if name.startswith(SHIPPED_PREFIX) else None
    try:
        return resolve_preprocessing(model, folder, run=run, source=source, mean=cfg.mean, std=cfg.std,
                                     crop_pct=cfg.crop_pct, interpolation=cfg.interpolation)
    except ValueError as e:
        raise EvalError(str(e)) from None


def _eval_dataset(cfg: EvalConfig, dataset: str, data_root: str | None, prep: Any,
                  synthetic_classes: int) -> Dataset:
    """The split to evaluate, prepared with ``prep``; synthetic data gets the model's class count."""
    from .data import build_dataset

    tcfg, size = prep.transform_config(), prep.img_size
    try:
        return build_dataset(dataset, data_root, cfg.split, size, train_transform=False, transform_cfg=tcfg,
                             num_classes=synthetic_classes, length=cfg.data_length, seed=cfg.seed)
    except OSError as e:
        raise EvalError(f"cannot read {dataset} data at {data_root!r}: {e}") from None


def _check_size(model: nn.Module, size: Any, asked: int | None) -> None:
    if size is not None and asked is not None and tuple(size) != (asked, asked):
        raise EvalError(f"--img-size {asked} does not match the input size {tuple(size)} "
                        f"{type(model).__name__} is built for; give --img-size {size[0]} or leave it out")


def _eval_model(cfg: EvalConfig, name: str, run: dict[str, Any], dataset: str, num_classes: int
                ) -> OpenedModel:
    """The unreduced model with the weights of ``cfg`` (:func:`open_model`). A timm model's input
    size: ``--img-size``, else the run's, else 32 for Fashion-MNIST and synthetic data, else the
    model's own. A checkpoint of another architecture, or a model built for another size than
    the one asked, is refused."""
    from .models import fixed_input_size

    own = comes_with_config(name)
    kwargs, size = dict(cfg.model_kwargs), cfg.img_size
    if not own:
        kwargs = dict((run.get("config") or {}).get("model_kwargs") or run.get("model_kwargs") or {})
        kwargs.update(cfg.model_kwargs)
        size = _first(cfg.img_size, run.get("img_size"), None if dataset == "imagefolder" else 32)
        if size is not None:
            kwargs.setdefault("img_size", size)
        kwargs.setdefault("num_classes", num_classes)
    try:
        opened = open_model(name, cfg.checkpoint, cfg.pretrained, kwargs, cfg.use_ema, cfg.seed)
    except ModelLoadError as e:
        raise EvalError(str(e)) from None
    built = describe(opened.model).image_size if own else fixed_input_size(opened.model)
    _check_size(opened.model, built, size)
    return opened


def _under_method(model: nn.Module, spec: str, own_plan: bool) -> nn.Module:
    """``model`` under the plan of ``spec``."""
    from .patch import use_method

    try:
        return use_method(model, spec, registered=own_plan)
    except (TypeError, ValueError) as e:
        raise EvalError(f"method {spec!r}: {e}") from None


def _time_plans(models: dict[str, nn.Module], loader: DataLoader, cfg: EvalConfig, info: Any
                ) -> dict[str, float]:
    """Images/s of each model on the first batch, interleaved round by round (see
    :func:`imagepiece.measure.time_interleaved`); the slowest process bounds the throughput under
    torchrun."""
    from .measure import time_interleaved

    if cfg.timing_runs == 0:
        return {}
    x = next(iter(loader))[0].to(info.device)
    with torch.autocast(info.device.type, enabled=cfg.amp and info.device.type == "cuda"):
        times = time_interleaved(models, x, cfg.timing_warmup, cfg.timing_runs)
    median = torch.tensor([statistics.median(times[k]) for k in models], dtype=torch.float64,
                          device=info.device)
    if info.world_size > 1:
        dist.all_reduce(median, op=dist.ReduceOp.MAX)
    return {k: len(x) * info.world_size / t for k, t in zip(models, median.tolist(), strict=True)}


def render(result: dict[str, Any], console: Any = None) -> None:
    """A rich table: one row per plan."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    where = f" (folder {result['folder']})" if result.get("folder") else ""
    table = Table(title=f"{result['model']} on {result['dataset']}/{result['split']}{where} "
                        f"({result['images']} images, {result['img_size']} px, weights: {result['weights']})")
    for name in ("method", "top-1", "top-5", "loss", "images/s", "speed-up"):
        table.add_column(name, justify="left" if name == "method" else "right")
    for row in result["results"]:
        table.add_row(row["method"], f"{row['top1']:.2f}", f"{row['top5']:.2f}", f"{row['loss']:.4f}",
                      f"{row['images_per_s']:.1f}", f"{row['speedup']:.2f}x" if row["speedup"] else "-")
    console.print(table)
    console.print(f"top-1/top-5 in percent; preprocessing: {result['preprocessing']}", soft_wrap=True)


def write_csv(result: dict[str, Any], path: str) -> None:
    """One row per plan (or shipped model) with what was evaluated, atomically; top-1/top-5 in
    percent."""
    from .checkpoint import atomic_write_csv

    context = {k: result[k] for k in ("model", "weights", "dataset", "split", "images", "preprocessing",
                                      "root", "device") if k in result}
    rows = [{**context, **r} for r in result["results"]]  # a shipped model's row names its model
    fields = list(dict.fromkeys(k for r in rows for k in r))
    atomic_write_csv(path, fields, rows)


def write_json(result: dict[str, Any], path: str) -> None:
    """Write the result atomically."""
    from .checkpoint import atomic_write
    from .options import json_safe

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(json_safe(result), f, indent=2, default=str, allow_nan=False)

    atomic_write(path, write)


def evaluate_shipped(data_root: str | None = None, split: str = "test", max_images: int | None = None,
                     batch_size: int = 256, timing_runs: int = 10, device: str = "cpu",
                     progress: Any = None) -> dict[str, Any]:
    """Accuracy of every model shipped in the package (each under its own plan) on Fashion-MNIST,
    then their images/s, interleaved in one process, each as a ratio to its card's ``reference``
    (the unreduced model of its set)."""
    from .options import check_count

    check_count(batch_size, "batch_size", 1)
    from .data import DEBIAN_FASHION_ROOT, PACKAGED_FASHION_ROOT, build_dataset, default_fashion_root
    from .measure import count_gmacs, time_interleaved
    from .zoo import load_shipped, shared_img_size, shipped_models

    cards = shipped_models()
    size = shared_img_size(cards)
    root = data_root or default_fashion_root(split)
    source = {DEBIAN_FASHION_ROOT: "Debian package dataset-fashion-mnist",
              PACKAGED_FASHION_ROOT: "the copy of the test split shipped with imagepiece"}
    source = source.get(root, "given folder")
    ds = first_images(build_dataset("fashion-mnist", root, split, size, train_transform=False), max_images)
    loader = make_eval_loader(ds, batch_size)
    models, rows = {}, []
    for i, (name, card) in enumerate(cards.items()):
        model = load_shipped(name).to(device)
        result = evaluate_model(model, loader, device)
        rows.append({"model": name, "method": card.method, "top1": result["top1"], "top5": result["top5"],
                     "loss": result["loss"], "card_top1": card.card.get("test_top1")})
        models[name] = model
        if progress is not None:
            progress(i + 1, len(cards), name)
    x = torch.randn(batch_size, 3, size, size)
    times = time_interleaved(models, x.to(device), 2, timing_runs)
    ips = {k: batch_size / statistics.median(v) for k, v in times.items()}
    for row in rows:
        m, reference = models[row["model"]], cards[row["model"]].reference
        row.update(images_per_s=ips[row["model"]], reference=reference,
                   speedup=ips[row["model"]] / ips[reference], gmacs=count_gmacs(m.cpu(), x[:4]))
    return {"dataset": "fashion-mnist", "split": split, "root": root, "source": source, "images": len(ds),
            "device": device, "threads": torch.get_num_threads(), "batch": batch_size, "results": rows}


def render_shipped(result: dict[str, Any], console: Any = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title=f"shipped models on Fashion-MNIST {result['split']} ({result['images']} images "
                        f"from {result['source']}: {result['root']})")
    # Plans are listed under the table: a full method spec in a column wraps into many lines on
    # an 80-column terminal.
    table.add_column("model", no_wrap=True)
    for name in ("top-1", "top-5", "card", "MMACs", "img/s", "speed-up"):
        table.add_column(name, justify="right", no_wrap=True)
    for r in result["results"]:
        card = f"{r['card_top1']:.2f}" if r["card_top1"] is not None else "-"
        table.add_row(r["model"], f"{r['top1']:.2f}", f"{r['top5']:.2f}", card,
                      f"{1000 * r['gmacs']:.1f}", f"{r['images_per_s']:.0f}",
                      f"{r['speedup']:.2f}x")
    console.print(table)
    for r in result["results"]:
        console.print(f"  {r['model']}: {r['method']}", soft_wrap=True)
    sets: dict[str, list[str]] = {}
    for r in result["results"]:
        sets.setdefault(r["reference"], []).append(r["model"])
    over = "; ".join(f"over {ref} for {', '.join(names)}" for ref, names in sets.items())
    console.print(f"{result['device']}, {result['threads']} threads, batch {result['batch']}; images/s "
                  "interleaved in this run (ratios count, absolute numbers depend on the machine); "
                  f"speed-up: images/s over the unreduced model trained the same way ({over}). "
                  "card: top-1 on the full test split recorded in the model card shipped with "
                  "imagepiece (imagepiece/assets/models/models.json).")
