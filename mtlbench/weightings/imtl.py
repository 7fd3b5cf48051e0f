"""``imtl``: impartial multi-task learning, gradient part (Liu, Li, Kuang, Xue, Chen, Yang,
Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021; IMTL-G).

The update ``d = Σ α_t g_t`` (``Σ α_t = 1``) has equal projections onto every task's unit
gradient ``u_t = g_t / ||g_t||``. With ``D`` the rows ``g_1 - g_t`` and ``U`` the rows
``u_1 - u_t`` (t = 2..T), ``α_{2:T} = g_1 Uᵀ (D Uᵀ)⁻¹`` and ``α_1 = 1 - Σ α_{2:T}``. Every
product involved is an entry of the Gram matrix scaled by gradient norms, so it is solved there.
"""
from __future__ import annotations

import numpy as np
import torch

from mtlbench.registry import register_weighting
from mtlbench.weighting import GradientWeighting


def imtl_alpha(gram: torch.Tensor) -> torch.Tensor:
    q = gram.detach().cpu().double().numpy()
    t = len(q)
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    gu = q / np.sqrt(np.maximum(np.diag(q), 1e-24))[None, :]  # gu[i, j] = g_i · u_j
    g1_u = gu[0, 0] - gu[0, 1:]                               # g_1 · (u_1 - u_j), j = 2..T
    du = g1_u[None, :] - (gu[1:, 0][:, None] - gu[1:, 1:])    # (g_1 - g_i) · (u_1 - u_j)
    rest = np.linalg.lstsq(du.T, g1_u, rcond=None)[0]
    return torch.from_numpy(np.concatenate([[1 - rest.sum()], rest]))


@register_weighting("imtl", "IMTL-G: the update with equal projections on every task's unit gradient.")
class IMTL(GradientWeighting):
    paper = "Liu et al., ICLR 2021 (IMTL-G)"

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        return imtl_alpha(gram)
