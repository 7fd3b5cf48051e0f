"""``rlw``: random loss weighting (Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random
Weighting: A Litmus Test for Multi-Task Learning", TMLR 2022, arXiv 2111.10603).

Each step draws ``ε ~ N(0, I)`` and weighs the losses by ``softmax(ε)``, scaled here by T so
that the mean weight is 1 as under ``ew`` (with Adam the scale does not change the update).
"""
from __future__ import annotations

import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import LossWeighting, run_generator


@register_weighting("rlw", "Random loss weighting: softmax of Gaussian noise each step.")
class RandomWeighting(LossWeighting):
    paper = "Lin et al., TMLR 2022"

    def __init__(self, num_tasks: int, options) -> None:
        super().__init__(num_tasks, options)
        self.generator = run_generator()

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        eps = torch.randn(len(losses), generator=self.generator, dtype=torch.float64)
        return (len(losses) * torch.softmax(eps, 0)).to(losses.dtype).to(losses.device)
