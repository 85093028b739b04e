"""Pictures of token reduction: which patches each token stands for, and where [CLS] looks.

:func:`visualize` runs one image through a model under several plans with tracing on, and
draws one row per method: the input, then for every chosen block the token partition after
that block's operation (each token's patches filled with their mean colour and outlined,
discarded patches greyed out, the members of EViT's fused token greyed and hatched in
magenta) and the class-attention heat map of the tokens entering that block's operation.
Every file is written to a temporary name and renamed, so an error leaves no partial file.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .analysis import AnalysisError, apply_method, input_size, model_device
from .checkpoint import atomic_write
from .patch import describe

__all__ = ["MethodView", "VisError", "contact_sheet", "load_image", "output_paths", "render_figure",
           "trace_image", "visualize"]

FUSED_TINT = np.array([0.85, 0.15, 0.75])
GREY = np.array([0.82, 0.82, 0.82])


class VisError(AnalysisError):
    """A clear, user-facing problem with an image, the model or a method."""


def load_image(path: str, size: tuple[int, int], mean: Sequence[float], std: Sequence[float],
               interpolation: str = "bicubic") -> tuple[np.ndarray, torch.Tensor]:
    """(RGB array in [0, 1] of the model's input size, normalised tensor (1, 3, H, W)).

    The shorter side is resized to the model size (with ``interpolation``, a PIL filter name)
    and the centre is cropped, so the whole image the figure shows is what the model sees.
    """
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise VisError(f"image {path!r} is a folder; give image files (e.g. {path}/*.png)")
    if not os.path.isfile(path):
        raise VisError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except UnidentifiedImageError:
        raise VisError(f"cannot read image {path!r}: not an image format Pillow can open") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise VisError(f"cannot read image {path!r}: {e}") from None
    H, W = size
    scale = max(H / rgb.height, W / rgb.width)
    rw, rh = max(W, round(rgb.width * scale)), max(H, round(rgb.height * scale))
    rgb = rgb.resize((rw, rh), Image.Resampling[interpolation.upper()])
    left, top = (rw - W) // 2, (rh - H) // 2
    rgb = rgb.crop((left, top, left + W, top + H))
    arr = np.asarray(rgb, dtype=np.float32) / 255.0
    x = torch.from_numpy(arr).permute(2, 0, 1)
    x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    return arr, x[None]


@dataclass
class BlockView:
    block: int
    kind: str
    tokens_in: int
    tokens_out: int
    labels: np.ndarray  # (gh, gw) token index per patch, -1 = discarded
    fused: np.ndarray  # (gh, gw) bool: patch is in EViT's fused token
    attention: np.ndarray | None  # (gh, gw) class attention (spread onto patches), entering the op
    features: np.ndarray | None = None  # (gh, gw, 3) unmerged block output, 3 principal components


@dataclass
class MethodView:
    method: str
    blocks: list[BlockView]


def trace_image(model: nn.Module, x: torch.Tensor, method: str, blocks: Sequence[int],
                features: bool = False) -> MethodView:
    """Run ``x`` (1, 3, H, W) under ``method`` with tracing and extract the chosen blocks;
    ``features`` adds each block's output unmerged to the grid, as principal-component colours."""
    apply_method(model, method)
    ctl = model.imagepiece
    depth = ctl.depth
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise VisError(f"--blocks {bad} out of range for a model with {depth} blocks (0..{depth - 1})")
    ctl.record(sources=True, scores=True)
    try:
        with torch.inference_mode():
            model(x.to(model_device(model)))
    except (RuntimeError, ValueError) as e:
        raise VisError(f"method {method!r} failed on this model: {e}") from None
    finally:
        ctl.record(False, False)
    trace = ctl.trace
    gh, gw = _grid(model, x)
    fused_set = np.zeros(gh * gw, dtype=bool)
    views = []
    for i, t in enumerate(trace):
        src = t.source[0].float().cpu().numpy() > 0.5  # (N_out, patches)
        if fused_set.any():  # follow earlier fused tokens (kept or merged later) to their tokens
            rows = src[:, fused_set].any(axis=1)
            fused_set = src[rows].any(axis=0) if rows.any() else np.zeros_like(fused_set)
        if t.fused:
            fused_set |= src[-1]
        if i not in blocks:
            continue
        labels = np.full(gh * gw, -1)
        for j in range(src.shape[0]):
            labels[src[j]] = j
        att = None if t.patch_scores is None else t.patch_scores[0].float().cpu().numpy().reshape(gh, gw)
        views.append(BlockView(i, t.kind, t.tokens_in, t.tokens_out, labels.reshape(gh, gw),
                               fused_set.reshape(gh, gw).copy(), att))
    if features:
        grids = _grid_features(model, x.to(model_device(model)), [v.block for v in views])
        for v, g in zip(views, grids, strict=True):
            v.features = pca_colours(g, (gh, gw))
    return MethodView(method, views)


def _grid_features(model: nn.Module, x: torch.Tensor, blocks: Sequence[int]) -> list[torch.Tensor]:
    """The outputs of ``blocks`` for one image on the full patch grid, ``(patches, C)`` each:
    timm's ``forward_intermediates`` or transformers' ``output_hidden_states``."""
    from .patch import is_transformers_model

    with torch.inference_mode():
        if is_transformers_model(model):
            states = model(x, output_hidden_states=True).hidden_states
            return [states[b + 1][0, model.imagepiece.num_prefix:] for b in blocks]
        feats = model.forward_intermediates(x, indices=list(blocks), output_fmt="NLC", norm=True,
                                            intermediates_only=True)
        return [f[0] for f in feats]


def pca_colours(features: torch.Tensor, grid: tuple[int, int]) -> np.ndarray:
    """``(patches, C)`` features as ``(gh, gw, 3)`` colours: the first three principal components,
    each scaled to [0, 1] (patches with one feature get one colour)."""
    f = features.float().cpu()
    f = f - f.mean(dim=0)
    _, _, v = torch.linalg.svd(f, full_matrices=False)
    pcs = f @ v[:3].T
    if pcs.shape[1] < 3:
        pcs = torch.cat([pcs, pcs.new_zeros(pcs.shape[0], 3 - pcs.shape[1])], dim=1)
    lo, hi = pcs.min(dim=0).values, pcs.max(dim=0).values
    return ((pcs - lo) / (hi - lo).clamp_min(1e-12)).reshape(*grid, 3).numpy()


def _grid(model: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    ph, pw = describe(model).patch_size
    return x.shape[-2] // ph, x.shape[-1] // pw


def default_blocks(model: nn.Module, methods: Sequence[str], limit: int = 4) -> list[int]:
    """The blocks where the methods reduce tokens (at most ``limit``, spread out), else the last."""
    found: set[int] = set()
    info = describe(model)
    for m in methods:
        apply_method(model, m)
        steps = model.imagepiece.steps(info.num_tokens)
        found |= {i for i, s in enumerate(steps) if s.kind != "none"}
    blocks = sorted(found) or [info.depth - 1]
    if len(blocks) > limit:
        idx = np.linspace(0, len(blocks) - 1, limit).round().astype(int)
        blocks = [blocks[i] for i in sorted(set(idx.tolist()))]
    return blocks


def _upsample(grid: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    gh, gw = grid.shape[:2]
    ys = np.arange(shape[0]) * gh // shape[0]
    xs = np.arange(shape[1]) * gw // shape[1]
    return grid[ys][:, xs]


def partition_image(image: np.ndarray, view: BlockView, scale: int) -> np.ndarray:
    """The image with every token's patches filled with their mean colour and outlined."""
    H, W, _ = image.shape
    gh, gw = view.labels.shape
    ph, pw = H // gh, W // gw
    patch_mean = image[: gh * ph, : gw * pw].reshape(gh, ph, gw, pw, 3).mean(axis=(1, 3))
    flat_labels = view.labels.reshape(-1)
    flat_means = patch_mean.reshape(-1, 3)
    colours = np.zeros_like(flat_means)
    for j in np.unique(flat_labels[flat_labels >= 0]):
        members = flat_labels == j
        colours[members] = flat_means[members].mean(axis=0)
    gray = flat_means.mean(axis=1, keepdims=True)
    discarded = flat_labels < 0
    colours[discarded] = 0.35 * gray[discarded] + 0.65 * GREY
    fused = view.fused.reshape(-1)
    colours[fused] = 0.35 * gray[fused] + 0.65 * GREY
    out_shape = (gh * ph * scale, gw * pw * scale)
    pix = _upsample(colours.reshape(gh, gw, 3), out_shape)
    lab = _upsample(view.labels, out_shape)
    fus = _upsample(view.fused, out_shape)
    # magenta hatching on the fused token's members
    yy, xx = np.mgrid[: out_shape[0], : out_shape[1]]
    period = max(4, out_shape[0] // 24)
    stripes = ((yy + xx) % period) < max(1, period // 3)
    pix[fus & stripes] = FUSED_TINT
    # outlines between different tokens (and around discarded patches)
    edge = np.zeros(out_shape, dtype=bool)
    edge[:-1] |= lab[:-1] != lab[1:]
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[1:] |= edge[:-1].copy()
    pix[edge] = 0.05
    return pix


def render_figure(image: np.ndarray, views: Sequence[MethodView], path: str, title: str = "") -> None:
    """One row per method: the input, then (partition, attention) for each traced block."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    nblocks = max(len(v.blocks) for v in views)
    per = 3 if any(bv.features is not None for v in views for bv in v.blocks) else 2
    cols = 1 + per * nblocks
    scale = max(1, int(np.ceil(192 / max(image.shape[:2]))))
    fig, axes = plt.subplots(len(views), cols, figsize=(1.9 * cols, 2.5 * len(views) + 1.0),
                             dpi=100, squeeze=False)
    for r, view in enumerate(views):
        ax = axes[r, 0]
        ax.imshow(image, interpolation="nearest")
        ax.set_title("input", fontsize=8)
        ax.set_ylabel(view.method, fontsize=9, rotation=90)
        for c, bv in enumerate(view.blocks):
            ax = axes[r, 1 + per * c]
            ax.imshow(partition_image(image, bv, scale), interpolation="nearest")
            ax.set_title(f"block {bv.block} {bv.kind}\n{bv.tokens_in}->{bv.tokens_out} tokens",
                         fontsize=7)
            if bv.features is not None:
                ax = axes[r, 3 + per * c]
                ax.imshow(_upsample(bv.features, image.shape[:2]), interpolation="nearest")
                ax.set_title(f"block {bv.block} features\n(unmerged, 3 PCs)", fontsize=7)
            ax = axes[r, 2 + per * c]
            ax.imshow(image.mean(axis=2), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            if bv.attention is not None:
                att = bv.attention.copy()
                seen = att > 0  # patches discarded before this block have no score
                if seen.any():
                    lo, hi = float(att[seen].min()), float(att[seen].max())
                    att = np.where(seen, (att - lo) / max(hi - lo, 1e-12), np.nan)
                ax.imshow(_upsample(att, image.shape[:2]), cmap="inferno", vmin=0, vmax=1,
                               alpha=0.75, interpolation="nearest")
            ax.set_title(f"block {bv.block}\nclass attention", fontsize=7)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.axis("off")
    handles = [Patch(facecolor="#b0a070", edgecolor="black", label="token (mean colour, outlined)"),
               Patch(facecolor=GREY, edgecolor="black", label="discarded (pruned, no fusion)"),
               Patch(facecolor=GREY, edgecolor=FUSED_TINT, hatch="///",
                     label="fused token members (EViT)"),
               Patch(facecolor="#f0d040",
                     label="class attention entering the block\n(min-max per panel, bright = high)")]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.09, 1, 0.96 if title else 1))
    fig.savefig(path, format="png")
    plt.close(fig)


def contact_sheet(paths: Sequence[str], out: str, width: int = 900) -> None:
    """Stack the per-image figures (scaled to ``width``) into one PNG, captioned by file name."""
    from PIL import Image, ImageDraw

    tiles = []
    for p in paths:
        with Image.open(p) as im:
            im = im.convert("RGB")
            h = round(im.height * width / im.width)
            tiles.append((os.path.basename(p), im.resize((width, h), Image.Resampling.LANCZOS)))
    sheet = Image.new("RGB", (width, sum(t.height + 18 for _, t in tiles)), "white")
    draw = ImageDraw.Draw(sheet)
    y = 0
    for name, tile in tiles:
        draw.text((6, y + 3), name, fill="black")
        sheet.paste(tile, (0, y + 18))
        y += tile.height + 18
    atomic_write(out, lambda tmp: sheet.save(tmp, format="PNG"))


def visualize(model: nn.Module, images: Sequence[str], methods: Sequence[str], out: str,
              blocks: Sequence[int] | None = None, features: bool = False, prep: Any = None) -> list[str]:
    """Write one PNG per image (and ``contact_sheet.png`` for several); returns the paths.
    ``features`` adds, beside each partition, the block's output unmerged to the full grid
    (first three principal components as colours). Images are normalised as ``prep`` says (a
    :class:`~imagepiece.preprocess.Preprocessing`; None: the model's own, see
    :func:`~imagepiece.preprocess.resolve_preprocessing`).

    ``out`` is a folder, or a ``.png`` file name when there is a single image. Every image,
    method and output path is checked before anything is written.
    """
    if not images:
        raise VisError("no image given")
    if not methods:
        raise VisError("no method given; e.g. --method tome --method evit --method imagepiece")
    targets = output_paths(images, out)
    size = input_size(model)
    if prep is None:
        from .preprocess import resolve_preprocessing

        prep = resolve_preprocessing(model)
    loaded = [(p, *load_image(p, size, prep.mean, prep.std, prep.interpolation))  # fails before any write
              for p in images]
    for m in methods:
        apply_method(model, m)
    blocks = list(blocks) if blocks else default_blocks(model, methods)
    rendered = [(path, arr, [trace_image(model, x, m, blocks, features) for m in methods])
                for path, arr, x in loaded]
    written = []
    for (path, arr, views), target in zip(rendered, targets, strict=False):
        atomic_write(target, lambda tmp, a=arr, v=views, n=os.path.basename(path):
                     render_figure(a, v, tmp, title=n))
        written.append(target)
    if len(targets) > len(images):
        contact_sheet(written, targets[-1])
        written.append(targets[-1])
    return written


# --out names ending so mean a file, never a folder to create.
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".pdf", ".svg", ".eps")


def output_paths(images: Sequence[str], out: str) -> list[str]:
    """The file each image's figure goes to (then ``contact_sheet.png`` for several images),
    checked to be writable and distinct before any work: two inputs ``a/x.png`` and ``b/x.jpg``
    would otherwise overwrite one another's figure."""
    from .options import OptionError, check_output_dir, check_output_file

    suffix = os.path.splitext(out)[1].lower()
    try:
        if len(images) == 1 and suffix == ".png":
            return [check_output_file(out, "--out")]
        if suffix in _FILE_SUFFIXES and not os.path.isdir(out):
            many = f"{len(images)} images give a folder of figures" if len(images) > 1 else \
                "figures are written as .png"
            raise VisError(f"--out {out!r} names a {suffix} file, but {many}; give a folder "
                           "(or a .png file for a single image)")
        check_output_dir(out, "--out")
    except OptionError as e:
        raise VisError(str(e)) from None
    targets = [os.path.join(out, f"{os.path.splitext(os.path.basename(p))[0]}.png") for p in images]
    if len(images) > 1:
        targets.append(os.path.join(out, "contact_sheet.png"))
    seen: dict[str, str] = {}
    for image, target in zip(list(images) + ["the contact sheet"], targets, strict=False):
        if target in seen:
            raise VisError(f"{seen[target]!r} and {image!r} would both be written to {target!r}; "
                           "rename one")
        if os.path.isdir(target):
            raise VisError(f"--out: {target!r} is a folder, where the figure of {image!r} goes")
        seen[target] = image
    return targets


def fashion_examples(folder: str, count: int = 4, root: str | None = None) -> list[str]:
    """Write the first ``count`` Fashion-MNIST test images of distinct classes as PNG files
    (an offline default input for the shipped models); returns their paths."""
    from PIL import Image

    from .data import FASHION_CLASSES, FashionMNIST, default_fashion_root

    ds = FashionMNIST(root or default_fashion_root("test"), "test")
    paths, seen = [], set()
    for i, label in enumerate(ds.targets.tolist()):
        if label in seen:
            continue
        seen.add(label)
        name = FASHION_CLASSES[label].lower().replace("/", "-").replace(" ", "-")
        path = os.path.join(folder, f"test{i:05d}-{name}.png")
        atomic_write(path, lambda tmp, a=ds.images[i]: Image.fromarray(a).save(tmp, format="PNG"))
        paths.append(path)
        if len(paths) == count:
            break
    return paths
