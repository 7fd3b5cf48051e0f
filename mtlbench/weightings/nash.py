"""``nash``: Nash-MTL (Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya,
"Multi-Task Learning as a Bargaining Game", ICML 2022, arXiv 2202.01017).

The update ``d = Σ α_t g_t`` is the Nash bargaining solution: ``α > 0`` with
``Gᵀ G α = 1 / α`` (elementwise), G the gradients as columns. That is the stationary point of
the strictly convex ``½ αᵀ (Gᵀ G) α - Σ log α_t`` on α > 0, found here by damped Newton steps
on the Gram matrix (scaled to unit norm for the solve, the answer scaled back); the paper
solves it with a sequence of convex programs (cvxpy), which the same conditions define.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientOptions, GradientWeighting


@dataclass
class NashOptions(GradientOptions):
    iterations: int = 100


def nash_alpha(gram: torch.Tensor, iterations: int = 100, tol: float = 1e-12) -> torch.Tensor:
    """α > 0 with ``gram α = 1 / α``."""
    q = gram.detach().cpu().double().numpy()
    norm = float(np.linalg.norm(q)) or 1.0
    q = q / norm
    alpha = 1.0 / np.sqrt(np.maximum(np.diag(q), 1e-12))
    objective = lambda a: 0.5 * a @ q @ a - np.log(a).sum()  # noqa: E731
    for _ in range(iterations):
        grad = q @ alpha - 1.0 / alpha
        if np.abs(grad).max() < tol:
            break
        step = np.linalg.solve(q + np.diag(1.0 / alpha ** 2), grad)
        size, before = 1.0, objective(alpha)
        while True:  # stay positive and descend
            trial = alpha - size * step
            if (trial > 0).all() and objective(trial) <= before:
                break
            size /= 2
            if size < 1e-12:
                trial = alpha
                break
        alpha = trial
    return torch.from_numpy(alpha / norm ** 0.5)


@register_weighting("nash", "Nash-MTL: the bargaining solution G^T G a = 1/a.")
class NashMTL(GradientWeighting):
    options_class = NashOptions
    paper = "Navon et al., ICML 2022"

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return nash_alpha(gram, self.options.iterations)
