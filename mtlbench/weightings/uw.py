"""``uw``: uncertainty weighting (Kendall, Gal, Cipolla, "Multi-Task Learning Using
Uncertainty to Weigh Losses for Scene Geometry and Semantics", CVPR 2018, arXiv 1705.07115).

Each task has a learned log-variance s_t (``log σ_t²``, initialised to 0); the loss is
``Σ exp(-s_t) L_t + s_t / 2``, the paper's form for a classification likelihood. Its
gradient in s_t vanishes at ``s_t = log(2 L_t)``. The s_t are trained by the run's optimiser
with the network. Recorded weights: ``exp(-s_t)``.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlbench.registry import register_weighting
from mtlbench.weighting import LossWeighting


@register_weighting("uw", "Uncertainty weighting: learned per-task log-variances.")
class UncertaintyWeighting(LossWeighting):
    paper = "Kendall et al., CVPR 2018"

    def __init__(self, num_tasks: int, options) -> None:
        super().__init__(num_tasks, options)
        self.log_var = nn.Parameter(torch.zeros(num_tasks))

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.exp(-self.log_var)

    def loss(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (weights * losses).sum() + 0.5 * self.log_var.sum()
