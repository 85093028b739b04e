"""Paired differences on the same test images: a 95% interval for "method A minus method B".

Every accuracy compared in the study is a weighted mean of per-image correctness vectors on the
same 10,000 test images: one row is one vector; a point with several seeds is the mean of its
seeds' vectors; a value read off a curve between two points is their interpolation
(``(1 - t) * left + t * right``). So a difference is ``sum_i w_i * mean(v_i)`` with signed weights,
and two sources of noise are added:

- **images**: the test images are a sample. A paired bootstrap resamples the images (2,000
  times, the same resample for every vector, so what the arms share cancels) and gives the
  standard error of the whole difference.
- **seeds**: training is random. Each point contributes ``(weight * s)^2 / n`` (``n`` its
  seeds): ``s`` is its own sample std of test top-1 over seeds when it has at least
  ``MIN_OWN_SEEDS``, else ``pooled``, the pooled seed std of comparable points (the std of two
  seeds rests on one degree of freedom: it can be near zero by chance and would then narrow the
  interval on no evidence). Off-the-shelf rows share one set of weights: no seed term.

The interval is ``d +- 1.96 * sqrt(se_images^2 + se_seeds^2)``; a verdict "agrees" needs it to
exclude zero (docs/study.md).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import numpy as np
import torch

RESAMPLES = 2000
Z95 = 1.959964
#: Seeds a point needs before its own seed std is used instead of the pooled one.
MIN_OWN_SEEDS = 3
#: Degrees of freedom a protocol's own pooled seed std needs before it replaces the study-wide one.
MIN_POOLED_DOF = 3


@dataclass(frozen=True)
class Term:
    """One point of an estimate: ``weight`` times the seed mean of ``vectors`` (bool per image)."""

    weight: float
    vectors: tuple[np.ndarray, ...]
    seeded: bool = True  # False: fixed weights (off the shelf), no seed noise

    def value(self) -> float:
        return self.weight * statistics.fmean(100 * float(v.mean()) for v in self.vectors)

    def seed_var(self, pooled: float) -> float:
        if not self.seeded:
            return 0.0
        accs = [100 * float(v.mean()) for v in self.vectors]
        s = statistics.stdev(accs) if len(accs) >= MIN_OWN_SEEDS else pooled
        return (self.weight * s) ** 2 / len(accs)


def paired(a: list[Term], b: list[Term], pooled: float, resamples: int = RESAMPLES, seed: int = 0
           ) -> dict[str, float]:
    """Difference ``a - b`` (top-1 points) with its image and seed standard errors and 95% interval."""
    terms = [(t.weight / len(t.vectors), v) for t in a for v in t.vectors]
    terms += [(-t.weight / len(t.vectors), v) for t in b for v in t.vectors]
    n = len(terms[0][1])
    if any(len(v) != n for _, v in terms):
        raise ValueError("paired vectors must cover the same images")
    combo = 100 * sum(w * v.astype(np.float64) for w, v in terms)  # per-image contribution
    diff = float(combo.mean())
    rng = np.random.default_rng(seed)
    boots = np.array([combo[rng.integers(0, n, n)].mean() for _ in range(resamples)])
    se_img = float(boots.std(ddof=1))
    se_seed = math.sqrt(sum(t.seed_var(pooled) for t in a + b))
    half = Z95 * math.hypot(se_img, se_seed)
    return {"diff": diff, "lo": diff - half, "hi": diff + half, "se_images": se_img, "se_seeds": se_seed}


def verdict(p: dict[str, float] | None, claimed: float = 0.0) -> str:
    """"agrees" when the interval is above zero (and reaches a claimed size), "disagrees" when
    it is below zero, else "within noise"."""
    if p is None:
        return "pending"
    if p["hi"] < 0:
        return "disagrees"
    if p["lo"] <= 0:
        return "within noise"
    if claimed > 0 and p["hi"] < claimed:
        return "agrees in direction, smaller"
    return "agrees"


def describe(p: dict[str, float]) -> str:
    return f"{p['diff']:+.2f} [{p['lo']:+.2f}, {p['hi']:+.2f}]"


def pooled_std(groups: list[list[float]]) -> float:
    """Pooled sample std over groups of seed accuracies (groups of one seed add nothing)."""
    num = sum(statistics.variance(g) * (len(g) - 1) for g in groups if len(g) > 1)
    dof = pooled_dof(groups)
    return math.sqrt(num / dof) if dof else math.nan


def pooled_dof(groups: list[list[float]]) -> int:
    """Degrees of freedom of :func:`pooled_std` over ``groups``."""
    return sum(len(g) - 1 for g in groups if len(g) > 1)


@torch.inference_mode()
def correct_vector(model: torch.nn.Module, loader) -> np.ndarray:
    """Per-image top-1 correctness of ``model`` over ``loader``, in loader order."""
    out = []
    for images, targets in loader:
        logits = model(images)
        out.append((logits.argmax(-1) == targets).numpy())
    return np.concatenate(out)


def pack(v: np.ndarray) -> str:
    return np.packbits(v.astype(np.uint8)).tobytes().hex()


def unpack(text: str, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n].astype(bool)
