"""The *limit* of a plan (docs/methods.md): the same blocks, same weights, on sequences that are already
cut to the plan's token counts, with no selection work. No implementation of the plan can be
faster, so ``speed-up / limit speed-up`` says how much the selection work costs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from ..patch import limit_forward, set_grad_checkpointing

__all__ = ["LimitViT"]


class LimitViT(nn.Module):
    """Runs ``model``'s blocks on pre-cut sequences: the fastest any implementation of a plan
    with these token counts can be (prefix handling and selection are ignored on purpose)."""

    def __init__(self, model: nn.Module, tokens: Sequence[tuple[int, int]]):
        super().__init__()
        self.model = model
        self.tokens = [tuple(t) for t in tokens]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        set_grad_checkpointing(self.model, enable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the blocks are checkpointed when the model's grad_checkpointing is on and it trains
        return limit_forward(self.model, x, self.tokens)
