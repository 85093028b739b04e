"""Are a reduced model's grid features still useful for dense work? A linear probe on frozen
features, per patch, on the Fashion-MNIST test copy that ships with the package (issue 24).

    python studies/dense_probe.py                      # writes results/dense_probe.{csv,md}

Two per-patch tasks built offline from the images themselves (28 px, 4 px patches, 7x7 grid):
``fg``, whether a patch is foreground (mean pixel intensity of the patch above 10% of full
scale), and ``seg``, an 11-way segmentation (background, or the garment's class on foreground
patches: the image label painted onto its foreground mask). A linear classifier is fitted on
the frozen features of the first ``--train`` images and scored on the next ``--test`` images
(disjoint). Features come from ``forward_intermediates`` (full grid, final norm applied), so
reduced and unreduced models are probed on the same 49 positions. Rows: the shipped models at
their presets (each fine-tuned under its plan), and the shipped baseline's weights under every
plan off the shelf; GMACs are those of the classification forward (``count_gmacs``), so rows at
similar GMACs are compared at matched compute.
"""

from __future__ import annotations

import argparse
import csv
import os

import numpy as np
import torch
from imagepiece.bench_measure import count_gmacs

import imagepiece
from imagepiece.data import FASHION_MEAN, FASHION_STD, FashionMNIST, default_fashion_root
from imagepiece.patch import use_method
from imagepiece.zoo import load_shipped, shipped_models

PATCH = 4
FG_THRESHOLD = 0.1  # of full scale, on a patch's mean intensity
PRESETS = {"tome": "tome:r=5;0.5", "evit": "evit:keep_rate=0.7", "imagepiece": "imagepiece:keep_rate=0.7"}


def load_images(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised images (count, 3, 28, 28), per-patch foreground (count, 49) and segmentation
    labels (count, 49): 0 background, 1 + class on foreground patches."""
    ds = FashionMNIST(default_fashion_root("test"), "test")
    raw = torch.from_numpy(np.asarray(ds.images[:count], dtype=np.float32) / 255.0)
    labels = torch.from_numpy(ds.targets[:count])
    n, h, w = raw.shape
    patches = raw.reshape(n, h // PATCH, PATCH, w // PATCH, PATCH).mean(dim=(2, 4)).reshape(n, -1)
    fg = patches > FG_THRESHOLD
    seg = torch.where(fg, labels[:, None] + 1, torch.zeros_like(labels[:, None]))
    x = ((raw - FASHION_MEAN[0]) / FASHION_STD[0]).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return x, fg.long(), seg


@torch.no_grad()
def grid_features(model, x: torch.Tensor, block: int, pruned: str, batch: int = 500) -> torch.Tensor:
    """(images * 49, C) features of ``block`` on the full grid, final norm applied."""
    out = []
    extra = dict(pruned=pruned) if imagepiece.is_patched(model) else {}  # an unpatched timm ViT
    for i in range(0, len(x), batch):
        (f,) = model.forward_intermediates(x[i:i + batch], indices=[block], norm=True, output_fmt="NLC",
                                           intermediates_only=True, **extra)
        out.append(f.reshape(-1, f.shape[-1]))
    return torch.cat(out)


def linear_probe(f_train, y_train, f_test, y_test, classes: int, steps: int, seed: int = 0):
    """Multinomial logistic regression (full-batch Adam, standardised features); returns test
    predictions."""
    mean, std = f_train.mean(0), f_train.std(0).clamp_min(1e-6)
    a, b = (f_train - mean) / std, (f_test - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(a.shape[1], classes)
    opt = torch.optim.Adam(probe.parameters(), lr=0.05, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(a), y_train).backward()
        opt.step()
    with torch.no_grad():
        return probe(b).argmax(-1)


def mean_iou(pred: torch.Tensor, target: torch.Tensor, classes: int) -> float:
    ious = []
    for c in range(classes):
        inter = ((pred == c) & (target == c)).sum().item()
        union = ((pred == c) | (target == c)).sum().item()
        if union:
            ious.append(inter / union)
    return 100.0 * sum(ious) / len(ious)


def configurations():
    """(row label, shipped model name, method spec): shipped models at their presets, and the
    baseline's weights under each plan off the shelf."""
    rows = [("baseline (none)", "baseline", "none")]
    rows += [(f"{n} (fine-tuned)", n, shipped_models()[n].method) for n in ("tome", "evit", "imagepiece")]
    rows += [(f"baseline weights + {n}", "baseline", spec) for n, spec in PRESETS.items()]
    return rows


def run(args) -> list[dict]:
    torch.set_num_threads(args.threads)
    x, fg, seg = load_images(args.train + args.test)
    cut = args.train * 49
    rows = []
    for label, name, spec in configurations():
        if args.rows and not any(r in label for r in args.rows):
            continue
        model = load_shipped(name, patched=False)
        if spec != "none":
            use_method(model, spec, registered=shipped_models()[name].model.startswith("imagepiece_"))
        gmacs = count_gmacs(model, x[:8])
        depth = len(model.blocks)
        reducing = imagepiece.is_patched(model) and not model.imagepiece.plan.is_identity
        for block in args.blocks:
            block = block % depth
            for pruned in (("fused", "last") if reducing and spec.split(":")[0] != "tome" else ("fused",)):
                f = grid_features(model, x, block, pruned)
                res = dict(row=label, model=name, method=spec, gmacs=round(gmacs * 1e3, 2), block=block,
                           pruned=pruned if reducing else "-")
                for task, y, classes in (("fg", fg.reshape(-1), 2), ("seg", seg.reshape(-1), 11)):
                    pred = linear_probe(f[:cut], y[:cut], f[cut:], y[cut:], classes, args.steps)
                    res[f"{task}_acc"] = round(100.0 * (pred == y[cut:]).float().mean().item(), 2)
                    if task == "seg":
                        res["seg_miou"] = round(mean_iou(pred, y[cut:], classes), 2)
                rows.append(res)
                print(res, flush=True)
    return rows


def write(rows: list[dict], out: str, args) -> None:
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["row", "method", "gmacs", "block", "pruned", "fg_acc", "seg_acc", "seg_miou"]
    lines = [f"Dense linear probe, Fashion-MNIST test copy: probe fitted on images 0-{args.train - 1}, "
             f"scored on the next {args.test} ({args.test * 49} patches); GMACs ×1e-3 per image.", "",
             "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=int, default=1000, help="images the probe is fitted on")
    p.add_argument("--test", type=int, default=1000, help="images the probe is scored on")
    p.add_argument("--blocks", type=int, nargs="+", default=[-1], help="blocks probed (-1: last)")
    p.add_argument("--steps", type=int, default=150, help="Adam steps of the probe")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", nargs="+", help="only the rows whose label contains one of these "
                   "(rows are independent: several processes can share the work)")
    p.add_argument("--out", default="results/dense_probe", help="output path without extension")
    args = p.parse_args()
    if min(args.train, args.test, args.steps) <= 0 or args.train + args.test > 10000:
        p.error("--train, --test and --steps must be positive, --train + --test at most 10000")
    write(run(args), args.out, args)
    print(f"wrote {args.out}.csv and {args.out}.md")


if __name__ == "__main__":
    main()
