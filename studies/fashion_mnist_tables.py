"""Markdown tables of a Fashion-MNIST study run, for docs/study.md.

    python studies/fashion_mnist_tables.py results/fashion_mnist > /tmp/tables.md
"""

from __future__ import annotations

import json
import os
import sys


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(folder: str) -> None:
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    meta = res["meta"]
    print(f"Machine: {meta['machine'].get('cpu', '?')}, {meta['settings']['threads']} threads, "
          f"torch {meta['torch']}; whole study {meta['minutes']:.0f} min; "
          f"tuned knobs {meta['tuned_knobs']}.\n")
    rows = []
    for s in res["summary"]:
        spread = (f"{s['test_top1']:.2f} ± {s['test_top1_std']:.2f} ({s['test_top1_min']:.2f}–"
                  f"{s['test_top1_max']:.2f})" if s["seeds"] > 1 else f"{s['test_top1']:.2f}")
        rows.append([s["method"], s["kind"], f"`{s['plan']}`", str(s["seeds"]), spread,
                     f"{s['gmacs'] * 1000:.1f}", f"{s['images_per_s']:.0f}", f"{s['speedup']:.2f}x"])
    print("### Headline\n")
    header = ["row", "training", "plan", "seeds", "test top-1 (%)", "MMACs", "img/s", "vs baseline"]
    print(table(header, rows))
    print("\n### Every run\n")
    rows = [[r["row"], f"{r['test_top1']:.2f}", f"{r['test_top5']:.2f}", f"{r['val_top1']:.2f}",
             f"`{r['command']}`"] for r in res["rows"]]
    print(table(["run", "test top-1", "test top-5", "val top-1", "reproduce"], rows))
    print("\n### Tuning (validation split, ImagePiece fine-tune, seed 0)\n")
    rows = [[str(t["merge_share"]), str(t["locality"]), str(t["rounds"]), f"{t['val_top1']:.2f}",
             "yes" if t["default"] else ""] for t in res["tuning"]]
    print(table(["merge_share", "locality", "rounds", "val top-1", "prior default"], rows))
    print("\n### Masking robustness (top-1 % on the first 2,000 test images)\n")
    counts = sorted({m["masks"] for m in res["masking"]})
    names = [r["row"] for r in res["rows"] if not r["row"].endswith(("-s1", "-s2"))]
    rows = []
    for name in names:
        acc = {m["masks"]: m["top1"] for m in res["masking"] if m["row"] == name}
        rows.append([name] + [f"{100 * acc[c]:.1f}" for c in counts])
    print(table(["run"] + [f"{c} masks" for c in counts], rows))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "results/fashion_mnist")
