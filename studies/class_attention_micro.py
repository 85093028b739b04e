"""Class attention on the keys attention leaves: two formulations timed against each other.

    python studies/class_attention_micro.py   # prints and writes results/profile/class_attention_micro.txt

``imagepiece.ops.class_attention`` multiplies the keys by the query column (``k @ qᵀ``). The
formulation it replaced multiplied the query by the transposed keys (``q @ kᵀ``). Both take the
keys as timm's attention leaves them: a ``(B, H, N, d)`` view of the fused qkv projection. For
DeiT-S at batch 1 and 32 and the study's model at batch 256 (2 threads, fp32), each formulation
is timed in alternation, five rounds of ``torch.utils.benchmark`` blocked runs, medians in µs.
Run it on an idle machine: any other process on the cores makes the numbers fiction.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import benchmark

from imagepiece.ops import class_attention

SHAPES = {"DeiT-S, batch 1": (1, 6, 197, 64), "DeiT-S, batch 32": (32, 6, 197, 64),
          "study model, batch 256": (256, 2, 50, 32)}


def query_times_keys(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The replaced formulation, step for step as ``class_attention`` ran it (no prefix)."""
    logits = (q[:, :, :1] * 0.125) @ k.transpose(-2, -1)  # (B, H, 1, N)
    return logits.float().softmax(dim=-1).mean(dim=1)[:, 0][:, 0:]


def keys_times_query(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return class_attention(q, k, 0.125, 0, True)  # what the package runs


def main(rounds: int = 5) -> str:
    torch.set_num_threads(2)
    lines = ["| shape (B, H, N, d) | q @ kᵀ (µs) | k @ qᵀ (µs) | ratio | max abs difference |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, (B, H, N, d) in SHAPES.items():
        q, k, _ = torch.randn(B, N, 3, H, d).permute(2, 0, 3, 1, 4).unbind(0)
        diff = (query_times_keys(q, k) - keys_times_query(q, k)).abs().max().item()
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(rounds):
            for key, fn in (("old", query_times_keys), ("new", keys_times_query)):
                timer = benchmark.Timer("fn(q, k)", globals={"fn": fn, "q": q, "k": k})
                times[key].append(timer.blocked_autorange(min_run_time=0.1).median * 1e6)
        old, new = (sorted(times[key])[rounds // 2] for key in ("old", "new"))
        lines.append(f"| {name} {(B, H, N, d)} | {old:.0f} | {new:.0f} | {new / old:.2f} | {diff:.1e} |")
    return "\n".join(lines)


if __name__ == "__main__":
    table = main()
    print(table)
    out = Path(__file__).resolve().parents[1] / "results" / "profile" / "class_attention_micro.txt"
    out.write_text(table + "\n")
    print(f"wrote {out}")
