"""The GPU speed table (issue 13, item 5): one prepared run, well inside a short device lease.

    python studies/gpu_bench.py                       # on a CUDA machine: writes results/bench_gpu.{txt,json}
    python studies/gpu_bench.py --dry-run             # anywhere: a tiny model on the CPU, no files
    python studies/gpu_bench.py --tome-src ~/ToMe     # also the official ToMe patch, from a local checkout

For DeiT-S and DeiT-B at 224 px, batch 256, fp16 and bf16 autocast, it prints ``imagepiece
bench``'s default table (the unmodified model, ToMe r=13, EViT 0.7, ImagePiece, ImagePiece
hyper-speed, each with its limit; interleaved rounds, CUDA synchronised) and then, when the
official ToMe code (facebookresearch/ToMe, module ``tome``) can be imported, its speed-up at
r=13 beside ours, both timed interleaved with the same unmodified model in one loop. The
official code is never part of this repository: install it on the machine (``pip install -e``
of a checkout) or point ``--tome-src`` at a checkout; without it the line says "skipped".

Timing budget on one H200: model creation and GMAC counting on the CPU take most of it; each
table is 5 variants + 5 limits x (3 + 10) rounds of batch 256 (DeiT-B fp16: about 50 ms a call).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
from typing import Any

import torch

from imagepiece import patch
from imagepiece.bench import (
    DEFAULT_METHODS,
    DTYPES,
    BenchConfig,
    BenchError,
    render,
    run_benchmark,
    write_json,
)
from imagepiece.measure import time_interleaved

MODELS = ("deit_small_patch16_224", "deit_base_patch16_224")
TINY = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=["fp16", "bf16", "fp32"])
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--tome-r", type=int, default=13)
    p.add_argument("--tome-src", default=None, help="A checkout of facebookresearch/ToMe (optional).")
    p.add_argument("--out", default="results/bench_gpu.txt",
                   help="Text of all tables; the JSON goes beside it (.json).")
    p.add_argument("--dry-run", action="store_true",
                   help="A tiny ViT on the CPU, batch 2, 1 round; writes no file unless --out is given.")
    args = p.parse_args(argv)
    if args.dry_run:
        explicit_out = any(a == "--out" or a.startswith("--out=") for a in (argv or sys.argv[1:]))
        args.device, args.models, args.batch = "cpu", ["vit_tiny_patch16_224"], 2
        args.warmup, args.runs, args.tome_r = 0, 1, 4
        args.out = args.out if explicit_out else None
    return args


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return dict(TINY) if args.dry_run else {}


def our_table(name: str, args: argparse.Namespace):
    """imagepiece bench's default variants on ``name``, every dtype of ``args``."""
    return run_benchmark(BenchConfig(
        model=name, model_kwargs=model_kwargs(args), methods=DEFAULT_METHODS,
        batch_sizes=(args.batch,), devices=(args.device,), dtypes=tuple(args.dtypes),
        warmup=args.warmup, runs=args.runs))


def _import_tome(src: str | None):
    if src:
        sys.path.insert(0, os.path.abspath(src))
    import tome  # the official module; PyPI's unrelated "tome" has no tome.patch.timm

    if not hasattr(getattr(tome, "patch", None), "timm"):
        raise ImportError(f"the module 'tome' at {getattr(tome, '__file__', '?')} is not "
                          "facebookresearch/ToMe (no tome.patch.timm)")
    return tome


def tome_beside_ours(name: str, dtype: str, args: argparse.Namespace) -> str:
    """One line: ToMe r speed-ups, ours and the official patch's, interleaved in one loop."""
    import timm

    try:
        tome = _import_tome(args.tome_src)
    except ImportError as e:
        return f"official ToMe r={args.tome_r}: skipped ({e})"
    torch.manual_seed(0)
    base = timm.create_model(name, **model_kwargs(args)).eval().to(args.device)
    ours = patch(copy.deepcopy(base), "tome", r=args.tome_r)
    official = copy.deepcopy(base)
    x = torch.randn(args.batch, 3, *base.patch_embed.img_size, device=args.device)
    dt = DTYPES[dtype]
    autocast = torch.autocast(args.device.split(":")[0], dtype=dt, enabled=dt != torch.float32)
    try:
        tome.patch.timm(official)
        official.r = args.tome_r
        with torch.inference_mode(), autocast:
            official(x)
    except Exception as e:  # noqa: BLE001 (the official code targets an older timm)
        return f"official ToMe r={args.tome_r}: failed on timm {timm.__version__}: {type(e).__name__}: {e}"
    with autocast:
        t = time_interleaved({"none": base, "ours": ours, "official": official}, x, args.warmup, args.runs)
    med = {k: statistics.median(v) for k, v in t.items()}
    return (f"ToMe r={args.tome_r}, {dtype}: ours {med['none'] / med['ours']:.2f}x, official "
            f"{med['none'] / med['official']:.2f}x (interleaved, median of {args.runs} rounds)")


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console

    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here; run it on a GPU machine or use --dry-run", file=sys.stderr)
        return 2
    console = Console(record=True, width=190)
    results = {}
    for name in args.models:
        try:
            result = our_table(name, args)
        except BenchError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        render(result, console)
        results[name] = result
        for line in dict.fromkeys(tome_beside_ours(name, dtype, args) for dtype in args.dtypes):
            console.print(line)  # a "skipped" line once, not once per dtype
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.write(console.export_text())
        for name, result in results.items():
            write_json(result, os.path.splitext(args.out)[0] + f"_{name}.json")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
