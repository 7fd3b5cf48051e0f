"""``aligned``: Aligned-MTL (Senushkin, Patakin, Kuznetsov, Konushin, "Independent Component
Alignment for Multi-Task Learning", CVPR 2023, arXiv 2305.19000).

The task gradients G (rows) are replaced by ``B G`` whose singular values are all equal (the
smallest one of G, so the system is stable and no task dominates): with the Gram matrix
``G Gᵀ = V Λ Vᵀ``, ``B = sqrt(λ_min) V Λ^{-1/2} Vᵀ`` on the eigenvectors with non-zero
eigenvalues (relative tolerance ``tol``). The update is the sum of the aligned gradients,
``d = 1ᵀ B G`` (equal task weights, as in the paper).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientOptions, GradientWeighting


@dataclass
class AlignedOptions(GradientOptions):
    tol: float = 1e-8


def alignment(gram: torch.Tensor, tol: float = 1e-8) -> torch.Tensor:
    """``B`` with ``B (G Gᵀ) Bᵀ = λ_min P`` (P the projector on the gradients' span)."""
    values, vectors = np.linalg.eigh(gram.detach().cpu().double().numpy())
    keep = values > tol * max(float(values.max()), 1e-300)
    values, vectors = values[keep], vectors[:, keep]
    if len(values) == 0:
        return torch.zeros(gram.shape, dtype=torch.float64)
    return torch.from_numpy(np.sqrt(values.min()) * (vectors / np.sqrt(values)) @ vectors.T)


@register_weighting("aligned", "Aligned-MTL: gradients aligned to equal singular values, then summed.")
class AlignedMTL(GradientWeighting):
    options_class = AlignedOptions
    paper = "Senushkin et al., CVPR 2023"

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return alignment(gram, self.options.tol).sum(dim=0)
