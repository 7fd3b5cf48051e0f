"""``mgda``: the multiple-gradient descent algorithm (Sener, Koltun, "Multi-Task Learning as
Multi-Objective Optimization", NeurIPS 2018, arXiv 1810.04650).

The update is the min-norm point of the convex hull of the task gradients,
``d = Σ c_t g_t`` with ``c = argmin_{c ∈ simplex} ||Σ c_t g_t||²``: a direction that decreases
every task's loss unless the point is 0 (Pareto-stationary). Solved exactly on the Gram
matrix (:func:`mtlbench.weighting.min_norm_simplex`). ``normalize`` scales each gradient
before solving, as the paper's code can (``l2``: by its norm; ``loss``: by its loss; ``loss+``:
by both); the coefficients then weigh the unscaled gradients, as there. MGDA-UB, the paper's
faster upper bound, is ``-o weighting.grads=rep`` (gradients on the shared representation).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientOptions, GradientWeighting, min_norm_simplex

NORMALIZE = ("none", "l2", "loss", "loss+")


@dataclass
class MGDAOptions(GradientOptions):
    normalize: str = "none"


@register_weighting("mgda", "MGDA: the min-norm convex combination of the task gradients.")
class MGDA(GradientWeighting):
    options_class = MGDAOptions
    paper = "Sener & Koltun, NeurIPS 2018 (MGDA-UB: grads=rep)"

    @classmethod
    def check_options(cls, options: MGDAOptions) -> None:
        super().check_options(options)
        if options.normalize not in NORMALIZE:
            raise MtlbenchError(f"weighting mgda option normalize must be one of {', '.join(NORMALIZE)}")

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        norms = gram.diagonal().clamp(min=0).sqrt()
        loss = losses.double().cpu().clamp(min=1e-12)
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.options.normalize]
        scale = scale.clamp(min=1e-12)
        return min_norm_simplex(gram / scale[:, None] / scale[None, :])
