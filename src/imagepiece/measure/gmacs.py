"""Compute of a forward pass, counted from the ops that actually run."""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["count_gmacs"]


def count_gmacs(model: nn.Module, x: torch.Tensor) -> float:
    """Multiply-accumulates per image (FLOPs / 2 / batch), counted from the ops that run.

    Attention runs on SDPA's math backend here: the counter has no formula for the fused CPU
    kernel (torch 2.14 counts nothing for it, 0.36 of DeiT-S's 4.6 GMACs), while the math
    backend's matmuls are counted exactly. Timing still uses the fused kernels.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops() / 2 / x.shape[0] / 1e9
