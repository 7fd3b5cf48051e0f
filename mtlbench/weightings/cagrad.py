"""``cagrad``: conflict-averse gradient descent (Liu, Liu, Jin, Stone, Liu, "Conflict-Averse
Gradient Descent for Multi-task Learning", NeurIPS 2021, arXiv 2110.14048).

With g0 the mean gradient and φ = c² ||g0||², the dual picks
``w = argmin_{w ∈ simplex} g_wᵀ g0 + sqrt(φ) ||g_w||`` (``g_w = Σ w_t g_t``), and the update is
``d = g0 + sqrt(φ) / ||g_w|| · g_w``, divided by ``1 + c²`` (the official code's default
rescaling; ``rescale=false`` keeps d). c = 0 gives the mean gradient; c = 0.4 is the paper's
default for its image benchmarks. The dual, a small convex problem, is solved on the Gram
matrix by accelerated projected gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientOptions, GradientWeighting, accelerated_simplex


@dataclass
class CAGradOptions(GradientOptions):
    c: float = 0.4
    rescale: bool = True


def dual(gram: torch.Tensor, c: float, iters: int = 2000) -> torch.Tensor:
    """The dual's minimiser w over the simplex."""
    q = gram.detach().cpu().double().numpy()
    q = q / (float(np.diag(q).max()) or 1.0)
    b = q.mean(axis=1)                              # g_i · g0
    root_phi = c * float(q.mean()) ** 0.5           # c ||g0||

    def grad(v):
        norm = float(v @ q @ v) ** 0.5
        return b + (root_phi * (q @ v) / norm if norm > 1e-12 else 0.0)

    # the norm term's curvature grows as ||g_w|| shrinks: bound it at the uniform point's norm
    norm0 = max(float(q.mean()) ** 0.5, 1e-6)
    lipschitz = float(np.linalg.eigvalsh(q).max()) * (1 + root_phi / norm0)
    return torch.from_numpy(accelerated_simplex(grad, lipschitz, len(q), iters))


@register_weighting("cagrad", "CAGrad: the best worst-case improvement near the mean gradient.")
class CAGrad(GradientWeighting):
    options_class = CAGradOptions
    paper = "Liu et al., NeurIPS 2021"

    @classmethod
    def check_options(cls, options: CAGradOptions) -> None:
        super().check_options(options)
        if options.c < 0:
            raise MtlbenchError("weighting cagrad needs c >= 0")

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        t, c = len(gram), self.options.c
        coef = torch.full((t,), 1.0 / t, dtype=gram.dtype)
        if c > 0:
            w = dual(gram, c)
            gw_norm = float(w @ gram @ w) ** 0.5
            g0_norm = float(gram.mean()) ** 0.5
            if gw_norm > 1e-12:
                coef = coef + c * g0_norm / gw_norm * w
        return coef / (1 + c ** 2) if self.options.rescale else coef
