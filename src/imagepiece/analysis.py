"""Analyses of token reduction behind the paper's Tables 4-7 and Figure 3.

Every analysis runs any model and any plan (preset spec such as ``"evit:keep_rate=0.5"``) on
a dataset and returns a :class:`Result` (rows of plain numbers plus metadata) that
:func:`save_result` writes as CSV, JSON and a PNG figure. Accuracies are in percent (as in
``eval`` and ``tune``); shares are fractions in [0, 1].

- :func:`masking_robustness` (Table 4): top-1 under n random square masks.
- :func:`attentiveness_change` (Table 5): share of inattentive tokens at block l that are
  attentive at block l + 1.
- :func:`merged_similarity` (Table 6): mean cosine similarity of merged pairs per block.
- :func:`important_merged` (Table 7): share of the tokens merged in the first merging block
  that are among the top p% by class attention.
- :func:`keep_rate_sweep` (Figure 3): accuracy against measured images/s.
- :func:`write_report`: one markdown file collecting the tables and figures of a directory.
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from .checkpoint import atomic_write
from .options import json_safe
from .plan import MethodError, knob_names, parse_method

__all__ = [
    "ANALYSES",
    "AnalysisError",
    "Result",
    "SyntheticImages",
    "attentiveness_change",
    "build_data",
    "check_fill",
    "important_merged",
    "keep_rate_sweep",
    "load_model",
    "masking_robustness",
    "merged_similarity",
    "random_masks",
    "save_result",
    "write_report",
]


class AnalysisError(ValueError):
    """A clear, user-facing problem with the model, plan, data or options."""


# --------------------------------------------------------------------------------------
# Files: everything is written to a temporary file first, then renamed into place.
# --------------------------------------------------------------------------------------


def _write_text(path: str, text: str) -> None:
    def go(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, go)


# --------------------------------------------------------------------------------------
# Models and plans
# --------------------------------------------------------------------------------------


def load_model(name: str, model_kwargs: dict[str, Any] | None = None, checkpoint: str | None = None,
               num_classes: int | None = None, seed: int = 0) -> nn.Module:
    """The model ``name`` unpatched, in eval mode (:func:`imagepiece.loading.open_model`: a timm
    name with random weights drawn after ``seed`` or the weights of ``checkpoint``, a shipped
    model, a transformers folder); ``num_classes`` sizes a timm model's head."""
    from .loading import ModelLoadError, comes_with_config, open_model

    kwargs = dict(model_kwargs or {})
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise AnalysisError(f"num_classes={num_classes!r} is not allowed; expected an integer >= 1")
        if isinstance(name, str) and not comes_with_config(name):
            kwargs.setdefault("num_classes", num_classes)
    try:
        return open_model(name, checkpoint, model_kwargs=kwargs, seed=seed).model
    except ModelLoadError as e:
        raise AnalysisError(str(e)) from None


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    """:func:`imagepiece.plan.parse_method`, raising :class:`AnalysisError` for a bad spec."""
    try:
        return parse_method(spec)
    except MethodError as e:
        raise AnalysisError(str(e)) from None


def apply_method(model: nn.Module, spec: str) -> nn.Module:
    """Patch ``model`` with the plan of ``spec``; a clear error when model and plan do not fit."""
    from . import patch

    name, knobs = _parse(spec)
    try:
        patch(model, name, **knobs)
    except (TypeError, ValueError) as e:
        raise AnalysisError(f"method {spec!r} does not fit {type(model).__name__} "
                            f"(depth {len(getattr(model, 'blocks', []))}): {e}") from None
    return model


def input_size(model: nn.Module) -> tuple[int, int]:
    pe = getattr(model, "patch_embed", None)
    from .patch import describe, is_transformers_model

    if is_transformers_model(model):
        return describe(model).image_size
    if pe is None or getattr(pe, "img_size", None) is None:
        raise AnalysisError(f"{type(model).__name__} is not a timm ViT with a patch embedding")
    return tuple(pe.img_size)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's weights are: every analysis moves its images (and builds its masks and
    index tensors) there, so a model on a GPU is analysed on the GPU."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _forward(model: nn.Module, images: torch.Tensor, spec: str) -> torch.Tensor:
    """The class scores (a transformers model's ``logits``) of the model under ``spec``."""
    try:
        out = model(images.to(model_device(model), non_blocking=True))
        return getattr(out, "logits", out)
    except (RuntimeError, ValueError) as e:
        raise AnalysisError(f"method {spec!r} failed on images {tuple(images.shape)}: {e}") from None


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """Easy, deterministic class-dependent images as normalised tensors (no files needed).

    Class c has a fixed random 4x4 colour layout (from ``seed``) upsampled to the image size;
    every sample adds Gaussian noise. A tiny ViT learns it in seconds.
    """

    def __init__(self, length: int = 128, num_classes: int = 4, img_size: int = 32, seed: int = 0,
                 noise: float = 0.3, offset: int = 0):
        if length < 1 or num_classes < 1 or img_size < 4:
            raise AnalysisError(f"synthetic data needs length>=1, num_classes>=1, img_size>=4; got "
                                f"{length}, {num_classes}, {img_size}")
        g = torch.Generator().manual_seed(seed)
        layouts = torch.rand(num_classes, 3, 4, 4, generator=g) * 4 - 2
        self.layouts = nn.functional.interpolate(layouts, size=(img_size, img_size), mode="nearest")
        self.length, self.num_classes, self.seed, self.noise, self.offset = (
            length, num_classes, seed, noise, offset)
        self.classes = [f"class{i}" for i in range(num_classes)]

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        target = index % self.num_classes
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + index + 1)
        img = self.layouts[target] + self.noise * torch.randn(self.layouts.shape[1:], generator=g)
        return img, target


def build_data(spec: str, split: str = "val", img_size: int = 32, num_classes: int = 10,
               length: int | None = None, seed: int = 0, transform_cfg: Any = None) -> Dataset:
    """A dataset from a ``--data`` spec.

    ``synthetic`` (built here, no files, already tensors), ``imagepiece-synthetic``
    (``data.py``'s synthetic images), ``fashion-mnist[:ROOT]``, ``imagefolder:ROOT`` or just
    ``ROOT`` (an ImageNet-style folder). Everything but ``synthetic`` uses
    ``imagepiece.data.build_dataset``, with the eval transform of ``transform_cfg`` (the model's
    preprocessing, see :mod:`imagepiece.preprocess`; None: the dataset's defaults).
    """
    from .data import SPLITS

    if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
        raise AnalysisError(f"length={length!r} is not allowed; expected an integer >= 1")
    if split not in SPLITS:  # synthetic data has no folders, but a typo must not pass as "val"
        raise AnalysisError(f"split={split!r} is not allowed; allowed: {', '.join(SPLITS)}")
    kind, _, root = (spec or "synthetic").partition(":")
    if kind == "synthetic":
        offset = 0 if split == "train" else 7_919_000
        default = 256 if split == "train" else 128
        return SyntheticImages(length if length is not None else default, num_classes, img_size,
                               seed, offset=offset)
    if kind not in ("imagepiece-synthetic", "fashion-mnist", "imagefolder"):
        root, kind = spec, "imagefolder"
    from .data import build_dataset

    try:
        ds = build_dataset(kind.replace("imagepiece-", ""), root or None, split, img_size,
                           train_transform=False, transform_cfg=transform_cfg, num_classes=num_classes,
                           length=length, seed=seed)
    except (ValueError, OSError) as e:
        raise AnalysisError(f"cannot load --data {spec!r}: {e}") from None
    if length is not None and len(ds) > length:
        g = torch.Generator().manual_seed(seed)
        ds = Subset(ds, torch.randperm(len(ds), generator=g)[:length].tolist())
    return ds


def _loader(ds: Dataset, batch_size: int) -> DataLoader:
    if len(ds) == 0:
        raise AnalysisError("the dataset is empty")
    return DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0)


# --------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------


@dataclass
class Result:
    """Rows of one analysis (plain numbers/strings) with its settings and a plotting recipe."""

    name: str
    title: str
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    columns: list[str] = field(default_factory=list)

    def __post_init__(self):
        if not self.columns:
            cols: list[str] = []
            for row in self.rows:
                cols += [k for k in row if k not in cols]
            self.columns = cols


def _fmt(v: Any) -> str:
    if v is None:  # NaN is stored as null in the JSON files
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4f}"
    return str(v)


def render(result: Result, console: Any = None) -> None:
    """Print the result as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=result.title)
    for c in result.columns:
        table.add_column(c, justify="left" if c in ("method", "pair", "block", "knob") else "right")
    for row in result.rows:
        table.add_row(*(_fmt(row.get(c, "")) for c in result.columns))
    (console or Console()).print(table)


def markdown_table(result: Result) -> str:
    lines = ["| " + " | ".join(result.columns) + " |",
             "| " + " | ".join("---" for _ in result.columns) + " |"]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in result.columns) + " |" for r in result.rows]
    return "\n".join(lines)


def save_result(result: Result, out_dir: str) -> dict[str, str]:
    """Write ``NAME.csv``, ``NAME.json`` and ``NAME.png`` under ``out_dir``; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {ext: os.path.join(out_dir, f"{result.name}.{ext}") for ext in ("csv", "json", "png")}

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=result.columns, extrasaction="ignore")
            w.writeheader()
            w.writerows(result.rows)

    def write_json(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            data = {"name": result.name, "title": result.title, "meta": result.meta,
                    "columns": result.columns, "rows": result.rows}
            json.dump(json_safe(data), f, indent=2, default=str, allow_nan=False)

    atomic_write(paths["csv"], write_csv)
    atomic_write(paths["json"], write_json)
    atomic_write(paths["png"], lambda tmp: PLOTS[result.name](result, tmp))
    return paths


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _finish(fig, ax, result: Result, path: str) -> None:
    import matplotlib.pyplot as plt

    ax.set_title(result.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def _line_plot(result: Result, path: str, x: str, y: str, group: str, xlabel: str, ylabel: str,
               ylim: tuple[float, float] | None = (0, 1), categorical: bool = False) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    groups: dict[str, list[dict]] = {}
    for row in result.rows:
        groups.setdefault(str(row[group]), []).append(row)
    labels: list[str] = []
    if categorical:
        for rows in groups.values():
            labels += [str(r[x]) for r in rows if str(r[x]) not in labels]
    for name, rows in groups.items():
        xs = [labels.index(str(r[x])) if categorical else r[x] for r in rows]
        ax.plot(xs, [r[y] for r in rows], marker="o", label=name)
    if categorical:
        ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 6 else 0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if ylim:
        ax.set_ylim(*ylim)
    _finish(fig, ax, result, path)


# --------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def accuracy(model: nn.Module, loader: DataLoader, spec: str,
             transform: Callable[[torch.Tensor, int], torch.Tensor] | None = None) -> tuple[float, float]:
    """(top-1 in percent, images/s of the forward passes) of the patched model on ``loader``."""
    correct = total = 0
    seconds = 0.0
    device = model_device(model)
    for i, (images, targets) in enumerate(loader):
        images = images.to(device)
        if transform is not None:
            images = transform(images, i)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        logits = _forward(model, images, spec)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        correct += (logits.argmax(-1).cpu() == targets).sum().item()
        total += len(targets)
    return 100 * correct / total, (total / seconds if seconds > 0 else float("nan"))


# --------------------------------------------------------------------------------------
# Table 4: robustness to random masks
# --------------------------------------------------------------------------------------

DEFAULT_MASK_COUNTS = (0, 7, 10, 15, 20, 25, 50)


def default_mask_size(img_size: int) -> int:
    """The paper's 16x16 masks on 224 px images, scaled to ``img_size`` (same area share)."""
    return max(1, round(16 * img_size / 224))


def check_fill(fill: float) -> float:
    """``fill`` when it is a finite number: NaN or infinite pixels would make every figure of
    the masking analysis a number computed from NaN inputs."""
    if isinstance(fill, bool) or not isinstance(fill, (int, float)) or not math.isfinite(fill):
        raise AnalysisError(f"fill={fill!r} is not allowed; expected a finite number (0 = the "
                            "dataset mean colour after normalisation)")
    return float(fill)


def random_masks(images: torch.Tensor, count: int, size: int, fill: float = 0.0, seed: int = 0,
                 aligned: bool = False) -> torch.Tensor:
    """A copy of ``images`` (B, C, H, W) with ``count`` random ``size``x``size`` squares per image
    set to ``fill`` (in the model's input space: 0 is the mean colour after normalisation).

    Positions come from ``seed`` only, so every method sees the same masks; ``aligned`` snaps
    them to a grid of ``size`` (patch-aligned when ``size`` is the patch size). Masks may overlap.
    """
    B, _, H, W = images.shape
    check_fill(fill)
    if count < 0 or size < 1 or size > min(H, W):
        raise AnalysisError(f"mask count {count} / size {size} not allowed for {H}x{W} images "
                            f"(count >= 0, 1 <= size <= {min(H, W)})")
    out = images.clone()
    if count == 0:
        return out
    g = torch.Generator().manual_seed(seed)
    if aligned:
        ys = torch.randint(0, H // size, (B, count), generator=g) * size
        xs = torch.randint(0, W // size, (B, count), generator=g) * size
    else:
        ys = torch.randint(0, H - size + 1, (B, count), generator=g)
        xs = torch.randint(0, W - size + 1, (B, count), generator=g)
    rows = torch.arange(H)
    cols = torch.arange(W)
    in_y = (rows[None, None, :] >= ys[..., None]) & (rows[None, None, :] < ys[..., None] + size)
    in_x = (cols[None, None, :] >= xs[..., None]) & (cols[None, None, :] < xs[..., None] + size)
    mask = (in_y[..., :, None] & in_x[..., None, :]).any(dim=1)  # (B, H, W)
    out.masked_fill_(mask[:, None].to(out.device), fill)  # drawn on the CPU: the same masks anywhere
    return out


def masking_robustness(model: nn.Module, ds: Dataset, methods: Sequence[str],
                       counts: Sequence[int] = DEFAULT_MASK_COUNTS, mask_size: int | None = None,
                       aligned: bool = False, fill: float = 0.0, seed: int = 0,
                       batch_size: int = 64) -> Result:
    """Top-1 of each method with 0, 7, 10, ... random square masks (paper Table 4)."""
    H, W = input_size(model)
    size = mask_size if mask_size is not None else default_mask_size(min(H, W))
    bad = [n for n in counts if isinstance(n, bool) or not isinstance(n, int) or n < 0]
    if bad:
        raise AnalysisError(f"mask counts {bad} are not allowed; expected integers >= 0")
    random_masks(torch.zeros(1, 1, H, W), 0, size, fill)  # a bad size or fill fails here, before any work
    loader = _loader(ds, batch_size)
    rows = []
    for spec in methods:
        apply_method(model, spec)
        for n in counts:
            def mask(images: torch.Tensor, i: int, n: int = n) -> torch.Tensor:
                return random_masks(images, n, size, fill, seed * 100_003 + i, aligned)

            top1, _ = accuracy(model, loader, spec, mask)
            rows.append({"method": spec, "masks": int(n), "top1": top1})
    meta = {"mask_size": size, "aligned": aligned, "fill": fill, "seed": seed, "images": len(ds),
            "counts": list(counts)}
    return Result("masking", f"Top-1 under random {size}x{size} masks", rows, meta,
                  ["method", "masks", "top1"])


def _plot_masking(result: Result, path: str) -> None:
    _line_plot(result, path, "masks", "top1", "method", "number of masks", "top-1 (%)")


# --------------------------------------------------------------------------------------
# Traced forward passes (Tables 5-7)
# --------------------------------------------------------------------------------------


@torch.inference_mode()
def _traces(model: nn.Module, loader: DataLoader, spec: str) -> list[list[Any]]:
    """The per-block traces (with sources and scores) of every batch."""
    apply_method(model, spec)
    ctl = model.imagepiece
    ctl.record(sources=True, scores=True)
    out = []
    try:
        for images, _ in loader:
            _forward(model, images, spec)
            out.append(list(ctl.trace))
    finally:
        ctl.record(False, False)
    return out


def _destinations(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """For each token of ``before`` (B, N_in, patches) the index of the ``after`` token that
    took over its patches, or -1 when its patches were discarded."""
    overlap = before @ after.transpose(1, 2)  # (B, N_in, N_out)
    best, idx = overlap.max(dim=-1)
    return torch.where(best > 0, idx, torch.full_like(idx, -1))


def _attentive(scores: torch.Tensor, keep_rate: float) -> torch.Tensor:
    """(B, n) bool: the top ``ceil(keep_rate · n)`` tokens by class attention."""
    B, n = scores.shape
    k = min(n, max(1, math.ceil(keep_rate * n)))
    top = scores.topk(k, dim=-1).indices
    return torch.zeros(B, n, dtype=torch.bool, device=scores.device).scatter_(1, top, True)


def attentiveness_change(model: nn.Module, ds: Dataset, methods: Sequence[str],
                         keep_rate: float | None = None, batch_size: int = 64) -> Result:
    """Per pair of consecutive blocks (l, l+1): the share of the patch tokens that are
    inattentive at l (outside the top ``keep_rate`` share by class attention) whose patches are,
    at l + 1, in a token that is attentive (paper Table 5).

    ``keep_rate`` defaults to the plan's own (0.7 for plans that do not prune). Tokens follow
    their patches through the operation of block l (a merged token is attentive at l + 1 when
    the group it joined is); discarded tokens, and tokens fused into EViT's fused token by the
    pruning of block l, count as not attentive at l + 1.
    """
    if keep_rate is not None and (isinstance(keep_rate, bool) or not 0 < keep_rate <= 1):
        raise AnalysisError(f"keep_rate={keep_rate!r} is not allowed; expected a value in (0, 1]")
    loader = _loader(ds, batch_size)
    rows = []
    for spec in methods:
        apply_method(model, spec)
        kr = keep_rate if keep_rate is not None else (model.imagepiece.plan.keep_rate or 0.7)
        P = model.imagepiece.num_prefix
        traces = _traces(model, loader, spec)
        depth = len(traces[0])
        for b in range(depth - 1):
            flips = inattentive = tokens = 0
            for trace in traces:
                t, nxt = trace[b], trace[b + 1]
                before = trace[b - 1].source if b else _identity_sources(t.source, P)
                dest = _destinations(before[:, P:], t.source[:, P:])  # patch-token indices
                att_now = _attentive(t.scores.float(), kr)
                att_next = _attentive(nxt.scores.float(), kr)
                if t.fused:  # tokens fused by this block's pruning were dropped: not attentive
                    att_next[:, -1] = False
                att_dest = torch.where(dest >= 0, att_next.gather(1, dest.clamp(min=0)),
                                       torch.zeros_like(att_now))
                inatt = ~att_now
                flips += (inatt & att_dest).sum().item()
                inattentive += inatt.sum().item()
                tokens += att_now.numel()
            rows.append({"method": spec, "pair": f"{b}->{b + 1}", "kind": traces[0][b].kind,
                         "inattentive_to_attentive": flips / max(inattentive, 1),
                         "share_of_all_tokens": flips / max(tokens, 1), "keep_rate": kr})
    return Result("attentiveness", "Inattentive tokens at block l that are attentive at l+1", rows,
                  {"keep_rate": keep_rate, "images": len(ds)},
                  ["method", "pair", "kind", "inattentive_to_attentive", "share_of_all_tokens",
                   "keep_rate"])


def _identity_sources(after: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """The source maps of the tokens entering block 0: prefix rows zero, patch i -> patch i."""
    B, _, patches = after.shape
    eye = torch.eye(patches, dtype=after.dtype, device=after.device).expand(B, -1, -1)
    return torch.cat([after.new_zeros(B, num_prefix, patches), eye], dim=1)


def _plot_attentiveness(result: Result, path: str) -> None:
    _line_plot(result, path, "pair", "inattentive_to_attentive", "method", "blocks (l -> l+1)",
               "share inattentive -> attentive", categorical=True)


def merged_similarity(model: nn.Module, ds: Dataset, methods: Sequence[str] = ("tome", "imagepiece"),
                      batch_size: int = 64) -> Result:
    """Mean cosine similarity (of the keys used for matching) of the pairs merged at each
    block that merges (paper Table 6); the JSON's ``meta`` holds first and last per method."""
    loader = _loader(ds, batch_size)
    rows = []
    summary = {}
    for spec in methods:
        traces = _traces(model, loader, spec)
        per_block = []
        for b in range(len(traces[0])):
            sims = [t[b].merged_similarity for t in traces if t[b].merged_similarity is not None
                    and t[b].merged_similarity.numel()]
            if not sims:
                continue
            sim = torch.cat([s.float().flatten() for s in sims])
            row = {"method": spec, "block": b, "kind": traces[0][b].kind,
                   "similarity": sim.mean().item(), "pairs": sim.numel()}
            rows.append(row)
            per_block.append(row)
        if not per_block:
            raise AnalysisError(f"method {spec!r} merges no tokens on this model; use tome, "
                                "imagepiece or imagepiece+tome")
        summary[spec] = {"first": per_block[0]["similarity"], "last": per_block[-1]["similarity"],
                         "first_block": per_block[0]["block"], "last_block": per_block[-1]["block"]}
    return Result("similarity", "Cosine similarity of merged pairs", rows,
                  {"images": len(ds), "first_last": summary},
                  ["method", "block", "kind", "similarity", "pairs"])


def _plot_similarity(result: Result, path: str) -> None:
    _line_plot(result, path, "block", "similarity", "method", "block", "mean cosine of merged pairs",
               ylim=(-1, 1))


DEFAULT_TOPS = (0.15, 0.2, 0.3, 0.7)


def important_merged(model: nn.Module, ds: Dataset, methods: Sequence[str] = ("tome",),
                     tops: Sequence[float] = DEFAULT_TOPS, batch_size: int = 64) -> Result:
    """Share of the patch tokens merged (as either member of a pair) in the first merging block
    that rank among the top p of tokens by class attention there (paper Table 7)."""
    for p in tops:
        if not 0 < p <= 1:
            raise AnalysisError(f"top share {p} must be in (0, 1]")
    loader = _loader(ds, batch_size)
    rows = []
    for spec in methods:
        traces = _traces(model, loader, spec)
        block = next((b for b, t in enumerate(traces[0]) if t.kind in ("merge", "retokenize")), None)
        if block is None:
            raise AnalysisError(f"method {spec!r} merges no tokens on this model; use tome, "
                                "imagepiece or imagepiece+tome")
        P = model.imagepiece.num_prefix
        hits = {p: 0 for p in tops}
        merged_total = 0
        for trace in traces:
            t = trace[block]
            before = trace[block - 1].source if block else _identity_sources(t.source, P)
            dest = _destinations(before[:, P:], t.source[:, P:])  # (B, n)
            # A token is merged when another input token went to the same output token.
            counts = torch.zeros(dest.shape[0], t.source.shape[1], dtype=torch.long, device=dest.device)
            counts.scatter_add_(1, dest.clamp(min=0), (dest >= 0).long())
            merged = (dest >= 0) & (counts.gather(1, dest.clamp(min=0)) > 1)
            merged_total += merged.sum().item()
            for p in tops:
                hits[p] += (merged & _attentive(t.scores.float(), p)).sum().item()
        for p in tops:
            rows.append({"method": spec, "block": block, "top": p,
                         "share_merged_in_top": hits[p] / max(merged_total, 1),
                         "merged_tokens": merged_total})
    return Result("important", "Merged tokens that are among the top-p by class attention", rows,
                  {"images": len(ds), "tops": list(tops)},
                  ["method", "block", "top", "share_merged_in_top", "merged_tokens"])


def _plot_important(result: Result, path: str) -> None:
    _line_plot(result, path, "top", "share_merged_in_top", "method", "top share by class attention",
               "share of merged tokens in the top set")


# --------------------------------------------------------------------------------------
# Figure 3: accuracy against throughput
# --------------------------------------------------------------------------------------

DEFAULT_KEEP_RATES = (0.5, 0.6, 0.7, 0.8, 0.9)


def default_rs(num_patches: int, depth: int, keep_rates: Sequence[float]) -> list[int]:
    """ToMe r values spanning roughly the same token budgets as ``keep_rates``."""
    rs = {max(1, round(2 * num_patches * (1 - kr) / depth)) for kr in keep_rates}
    return sorted(rs)


def keep_rate_sweep(model: nn.Module, ds: Dataset, methods: Sequence[str] = ("evit", "tome", "imagepiece"),
                    keep_rates: Sequence[float] = DEFAULT_KEEP_RATES, rs: Sequence[int] | None = None,
                    batch_size: int = 64, repeats: int = 2) -> Result:
    """Top-1 and measured images/s of each method over keep rates (or ToMe's r), plus the
    unmodified model. Each variant gets an untimed warm-up batch; images/s is the best of
    ``repeats`` passes over the data, the passes after the first interleaving all variants.
    On a shared CPU only the ratios of one run mean anything."""
    from .patch import describe

    loader = _loader(ds, batch_size)
    info = describe(model)  # timm or transformers alike
    patches = math.prod(s // p for s, p in zip(info.image_size, info.patch_size, strict=True))
    depth = info.depth
    variants: list[tuple[str, str, str, float]] = [("none", "none", "-", float("nan"))]
    for spec in methods:
        name, knobs = _parse(spec)
        names = knob_names(name)
        if "keep_rate" in names and "keep_rate" not in knobs:
            values = [("keep_rate", kr) for kr in keep_rates]
        elif "r" in names and "r" not in knobs:
            values = [("r", r) for r in (rs or default_rs(patches, depth, keep_rates))]
        else:
            values = [("-", float("nan"))]
        for knob, v in values:
            extra = f"{knob}={v}" if knob != "-" else ""
            full = spec + ((":" if ":" not in spec else ",") + extra if extra else "")
            variants.append((spec, full, knob, v))
    rows = []
    warm = next(iter(loader))[0].to(model_device(model))
    for spec, full, knob, v in variants:
        apply_method(model, full)
        with torch.inference_mode():
            _forward(model, warm, full)  # warm-up, not timed
        top1, speed = accuracy(model, loader, full)
        n_out = model.imagepiece.token_counts(info.num_tokens)
        rows.append({"method": spec, "variant": full, "knob": knob, "value": v, "top1": top1,
                     "images_per_s": speed, "final_tokens": n_out[-1][1]})
    for _ in range(max(0, repeats - 1)):  # later passes interleave the variants
        for row in rows:
            apply_method(model, row["variant"])
            row["images_per_s"] = max(row["images_per_s"], accuracy(model, loader, row["variant"])[1])
    return Result("sweep", "Top-1 against measured throughput", rows,
                  {"images": len(ds), "batch_size": batch_size, "threads": torch.get_num_threads(),
                   "repeats": repeats},
                  ["method", "variant", "knob", "value", "top1", "images_per_s", "final_tokens"])


def _plot_sweep(result: Result, path: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    groups: dict[str, list[dict]] = {}
    for row in result.rows:
        groups.setdefault(row["method"], []).append(row)
    for name, rows in groups.items():
        rows = sorted(rows, key=lambda r: -1 if math.isnan(r["value"]) else r["value"])
        style = {"marker": "*", "markersize": 12, "linestyle": "none"} if name == "none" else {"marker": "o"}
        ax.plot([r["images_per_s"] for r in rows], [r["top1"] for r in rows], label=name, **style)
        for r in rows:
            if r["knob"] != "-":
                ax.annotate(f"{r['value']:g}", (r["images_per_s"], r["top1"]), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("images / s (measured)")
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 1)
    _finish(fig, ax, result, path)


PLOTS: dict[str, Callable[[Result, str], None]] = {
    "masking": _plot_masking,
    "attentiveness": _plot_attentiveness,
    "similarity": _plot_similarity,
    "important": _plot_important,
    "sweep": _plot_sweep,
}

ANALYSES = {
    "masking": ("Robustness to random masks (paper Table 4)", masking_robustness),
    "attentiveness": ("Attentiveness change (paper Table 5)", attentiveness_change),
    "similarity": ("Merged-pair similarity (paper Table 6)", merged_similarity),
    "important": ("Important tokens merged by the first merging block (paper Table 7)", important_merged),
    "sweep": ("Accuracy against throughput (paper Figure 3)", keep_rate_sweep),
}


# --------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------


def write_report(out_dir: str, setup: dict[str, Any] | None = None, path: str | None = None) -> str:
    """Collect every ``NAME.json``/``NAME.png`` of ``out_dir`` into ``report.md``."""
    found = [n for n in ANALYSES if os.path.isfile(os.path.join(out_dir, f"{n}.json"))]
    if not found:
        raise AnalysisError(f"no analysis results (masking.json, sweep.json, ...) in {out_dir!r}; "
                            "run `imagepiece analyze ... masking` (or `all`) first")
    parts = ["# imagepiece analysis report", ""]
    if setup is None:
        with open(os.path.join(out_dir, f"{found[0]}.json"), encoding="utf-8") as f:
            setup = json.load(f).get("meta", {}).get("setup")
    if setup:
        parts += ["| setting | value |", "| --- | --- |"]
        parts += [f"| {k} | {v} |" for k, v in setup.items()]
        parts.append("")
    for name in found:
        with open(os.path.join(out_dir, f"{name}.json"), encoding="utf-8") as f:
            data = json.load(f)
        result = Result(name, data["title"], data["rows"], data.get("meta", {}), data["columns"])
        parts += [f"## {ANALYSES[name][0]}", "", f"{result.title}.", "",
                  "Settings: " + ", ".join(f"{k}={v}" for k, v in result.meta.items() if k != "setup"),
                  "",
                  markdown_table(result), ""]
        if os.path.isfile(os.path.join(out_dir, f"{name}.png")):
            parts += [f"![{name}]({name}.png)", ""]
    path = path or os.path.join(out_dir, "report.md")
    _write_text(path, "\n".join(parts))
    return path


# --------------------------------------------------------------------------------------
# Tiny training (tests, demos): a few seconds on easy synthetic data
# --------------------------------------------------------------------------------------


def quick_train(model: nn.Module, ds: Dataset, steps: int = 60, lr: float = 3e-3,
                batch_size: int = 32, seed: int = 0) -> nn.Module:
    """Train ``model`` (unpatched forward) briefly with AdamW; returns it in eval mode."""
    torch.manual_seed(seed)
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    done = 0
    while done < steps:
        for images, targets in loader:
            loss = nn.functional.cross_entropy(model(images), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done >= steps:
                break
    return model.eval()
