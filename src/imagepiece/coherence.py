"""ImagePiece's local coherence bias: overlapping convolutions that feed the patch embedding.

Neighbouring patches that see overlapping pixels get similar embeddings, so non-semantic
pieces of one object group naturally when ImagePiece merges them (docs/methods.md; the paper reports
first-layer merged-pair similarity rising from 0.53 to 0.81 with it).

Two modes:
- ``stem`` replaces the linear patchify by the convolution stack (train from scratch).
- ``residual`` adds the stack to the linear patchify with its last layer zero-initialised,
  so a pretrained model computes exactly what it did before fine-tuning starts.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["COHERENCE_MODES", "CoherenceStem", "ResidualCoherence", "add_coherence", "coherence_mode"]

COHERENCE_MODES = ("stem", "residual")


def _num_stages(patch_size: int) -> int:
    stages = int(math.log2(patch_size)) if patch_size >= 2 else 0
    if patch_size < 2 or 2**stages != patch_size:
        raise ValueError(
            f"patch size {patch_size} cannot be served by the coherence bias: it needs a power "
            "of two >= 2 (one stride-2 3x3 convolution per factor of 2)"
        )
    return stages


class CoherenceStem(nn.Module):
    """``log2(p)`` stride-2 3×3 convolutions (BatchNorm + ReLU) then a 1×1 convolution to the
    embedding width: the "early convolutions" stem shape. Output ``(B, D, H/p, W/p)``."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int):
        super().__init__()
        stages = _num_stages(patch_size)
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = max(8, embed_dim // 2 ** (stages - 1 - i))
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]
            c_in = c_out
        self.convs = nn.Sequential(*layers)
        self.out = nn.Conv2d(c_in, embed_dim, 1)
        self.patch_size = patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return self.out(self.convs(x))
        # Inference: each BatchNorm folded into its convolution, one pass over the activations
        # fewer per stage; the same function up to float rounding.
        layers = list(self.convs)
        for conv, bn, act in zip(layers[::3], layers[1::3], layers[2::3], strict=True):
            if bn.running_var is None:  # batch statistics even in eval: nothing to fold
                x = act(bn(conv(x)))
                continue
            w, b = _fold_batchnorm(conv.weight, bn)
            x = act(F.conv2d(x, w, b, conv.stride, conv.padding))
        return self.out(x)


def _fold_batchnorm(weight: torch.Tensor, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of a bias-free convolution followed by ``bn`` in eval mode, as one
    convolution. (torch.nn.utils.fusion.fuse_conv_bn_weights returns new ``nn.Parameter``s,
    which a compiled graph cannot create on every call.)"""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    bias = -bn.running_mean * scale
    if bn.bias is not None:
        bias = bias + bn.bias
    return weight * scale.reshape(-1, 1, 1, 1), bias


class ResidualCoherence(nn.Conv2d):
    """The linear patchify (its own ``weight``/``bias``, so timm checkpoints load unchanged)
    plus a zero-initialised :class:`CoherenceStem` branch."""

    def __init__(self, proj: nn.Conv2d):
        super().__init__(proj.in_channels, proj.out_channels, proj.kernel_size, proj.stride,
                         proj.padding, bias=proj.bias is not None,
                         device=proj.weight.device, dtype=proj.weight.dtype)
        with torch.no_grad():
            self.weight.copy_(proj.weight)
            if proj.bias is not None:
                self.bias.copy_(proj.bias)
        self.branch = CoherenceStem(proj.in_channels, proj.out_channels, proj.kernel_size[0])
        self.branch.to(device=proj.weight.device, dtype=proj.weight.dtype)
        nn.init.zeros_(self.branch.out.weight)
        nn.init.zeros_(self.branch.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.branch(x)


def coherence_mode(model: nn.Module) -> str | None:
    """``"stem"``, ``"residual"`` or ``None`` for a model's patch embedding."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    if isinstance(proj, ResidualCoherence):
        return "residual"
    if isinstance(proj, CoherenceStem):
        return "stem"
    return None


def add_coherence(model: nn.Module, mode: str | None) -> nn.Module:
    """Give a timm ViT's patch embedding the local coherence bias, in place; returns the model.

    ``mode=None`` does nothing. Raises ``ValueError`` for an unknown mode, a model that already
    has the bias, or a patch size that is not a square power of two.
    """
    if mode is None:
        return model
    if mode not in COHERENCE_MODES:
        raise ValueError(f"coherence={mode!r} is not allowed; expected one of {COHERENCE_MODES} or None")
    pe = getattr(model, "patch_embed", None)
    proj = getattr(pe, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise TypeError(f"{type(model).__name__} has no convolutional patch embedding "
                        "(patch_embed.proj) to add the coherence bias to")
    if coherence_mode(model) is not None:
        raise ValueError(f"the model already has the coherence bias ({coherence_mode(model)})")
    ph, pw = proj.kernel_size
    if ph != pw or proj.stride != proj.kernel_size:
        raise ValueError(f"patch size {ph}x{pw} cannot be served by the coherence bias: "
                         "it needs square, non-overlapping patches")
    _num_stages(ph)
    if mode == "residual":
        pe.proj = ResidualCoherence(proj)
    else:
        stem = CoherenceStem(proj.in_channels, proj.out_channels, ph)
        pe.proj = stem.to(device=proj.weight.device, dtype=proj.weight.dtype)
    return model
