"""``ew``: equal weights, the plain sum of the task losses (the default)."""
from __future__ import annotations

import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import LossWeighting


@register_weighting("ew", "Equal weights: the plain sum of the task losses (the default).")
class EqualWeighting(LossWeighting):
    paper = "the plain multi-task sum"

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(losses)

    def loss(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return losses.sum()  # no multiply: the plain sum, bit for bit
