"""``famo``: fast adaptive multitask optimisation (Liu, Liang, Gong, Stone, Liu, "FAMO: Fast
Adaptive Multitask Optimization", NeurIPS 2023, arXiv 2306.03792).

O(1) per step: no per-task gradients. Task logits ξ (0 at the start) give ``z = softmax(ξ)``;
the step descends ``Σ_t c z_t log L_t`` with ``c = (Σ_t z_t / L_t)^-1``, i.e. the losses are
weighted by ``c z_t / L_t``. After the update, the same batch's losses L'_t give
``δ_t = log L_t - log L'_t`` and ξ moves by ``-lr (J_zᵀ δ + decay ξ)`` (J_z: the Jacobian of
the softmax), so tasks whose loss fell least gain weight. Defaults from the paper: lr 0.025,
decay 0.001. The extra look at the losses leaves batch-norm statistics untouched.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_weighting
from mtlbench.weighting import LossWeighting, WeightingOptions


@dataclass
class FAMOOptions(WeightingOptions):
    lr: float = 0.025
    decay: float = 0.001
    min_loss: float = 0.0  # the losses' lower bound (0 for cross-entropy)


@register_weighting("famo", "FAMO: loss weights from how fast each task's log-loss falls; O(1) per step.")
class FAMO(LossWeighting):
    options_class = FAMOOptions
    paper = "Liu et al., NeurIPS 2023"
    needs_losses_after_step = True

    @classmethod
    def check_options(cls, options: FAMOOptions) -> None:
        if not options.lr > 0 or options.decay < 0:
            raise MtlbenchError("weighting famo needs lr > 0 and decay >= 0")

    def __init__(self, num_tasks: int, options: FAMOOptions) -> None:
        super().__init__(num_tasks, options)
        self.register_buffer("logits", torch.zeros(num_tasks))
        self._before: torch.Tensor | None = None

    def _shifted(self, losses: torch.Tensor) -> torch.Tensor:
        return (losses.detach() - self.options.min_loss).clamp(min=1e-8)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        shifted = self._shifted(losses)
        z = torch.softmax(self.logits, 0)
        c = 1.0 / (z / shifted).sum()
        self._before = shifted
        return c * z / shifted

    def after_step(self, losses: torch.Tensor) -> None:
        if self._before is None:
            return
        delta = self._before.log() - self._shifted(losses).log()
        z = torch.softmax(self.logits, 0)
        jacobian_t_delta = z * (delta - (z * delta).sum())  # J_zᵀ δ for the softmax
        self.logits -= self.options.lr * (jacobian_t_delta + self.options.decay * self.logits)
        self._before = None
