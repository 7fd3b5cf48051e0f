"""``pcgrad``: projecting conflicting gradients (Yu, Kumar, Gupta, Levine, Hausman, Finn,
"Gradient Surgery for Multi-Task Learning", NeurIPS 2020, arXiv 2001.06782).

Each task's gradient g_i, in turn against every other task's original gradient g_j in a random
order, loses its component along g_j when the two conflict (``g_i' · g_j < 0``):
``g_i' -= (g_i' · g_j / ||g_j||²) g_j``. The update is the sum of the projected gradients.
Every projected gradient stays a combination of the originals, so the surgery runs on the
Gram matrix, tracking each g_i' as coefficients (:func:`project`).
"""
from __future__ import annotations

import numpy as np
import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientWeighting, run_generator


def project(gram: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    """Row i: the coefficients of task i's projected gradient over the original gradients, with
    the other tasks visited in ``orders[i]``."""
    q = gram.detach().cpu().double().numpy()
    t = len(q)
    a = np.eye(t)
    for i in range(t):
        row = a[i]
        dots = q[i].copy()  # row · q[:, j] for every j, kept up to date as row changes
        for j in orders[i]:
            if j != i and dots[j] < 0 and q[j, j] > 0:
                step = dots[j] / q[j, j]
                row[j] -= step
                dots -= step * q[j]
    return torch.from_numpy(a)


@register_weighting("pcgrad", "PCGrad: project away each gradient's conflict with the others.")
class PCGrad(GradientWeighting):
    paper = "Yu et al., NeurIPS 2020"

    def __init__(self, num_tasks: int, options) -> None:
        super().__init__(num_tasks, options)
        self.generator = run_generator()

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        t = len(gram)
        orders = [torch.randperm(t, generator=self.generator).tolist() for _ in range(t)]
        return project(gram, orders).sum(dim=0)
