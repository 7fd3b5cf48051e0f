"""``dwa``: dynamic weight average (Liu, Johns, Davison, "End-to-End Multi-Task Learning with
Attention", CVPR 2019, arXiv 1803.10704; the MTAN paper).

``w_t(k) = T exp(r_t(k-1) / τ) / Σ_i exp(r_i(k-1) / τ)`` with ``r_t(k-1) = L̄_t(k-1) / L̄_t(k-2)``,
where L̄_t(k) is task t's mean loss over period k (an epoch in the paper; here ``period``
steps, 0 meaning one epoch of the run's schedule) and τ the temperature (2 in the paper).
Weights are 1 for the first two periods.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench.errors import MtlbenchError
from mtlbench.registry import register_weighting
from mtlbench.weighting import LossWeighting, WeightingOptions


@dataclass
class DWAOptions(WeightingOptions):
    temperature: float = 2.0
    period: int = 0  # steps per averaging period; 0: one epoch of the schedule


@register_weighting("dwa", "Dynamic weight average: weights from the ratio of recent losses.")
class DynamicWeightAverage(LossWeighting):
    options_class = DWAOptions
    paper = "Liu et al., CVPR 2019"

    @classmethod
    def check_options(cls, options: DWAOptions) -> None:
        if not options.temperature > 0 or options.period < 0:
            raise MtlbenchError("weighting dwa needs temperature > 0 and period >= 0")

    def __init__(self, num_tasks: int, options: DWAOptions) -> None:
        super().__init__(num_tasks, options)
        self._sum = torch.zeros(num_tasks, dtype=torch.float64)
        self._steps = 0
        self._history: list[torch.Tensor] = []  # mean losses of finished periods
        self._current = torch.ones(num_tasks, dtype=torch.float64)

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        w = self._current.to(losses.dtype).to(losses.device)
        self._sum += losses.detach().double().cpu()
        self._steps += 1
        if self._steps == (self.options.period or self.steps_per_epoch):
            self._history = (self._history + [self._sum / self._steps])[-2:]
            self._sum, self._steps = torch.zeros_like(self._sum), 0
            if len(self._history) == 2:
                ratio = self._history[1] / self._history[0].clamp(min=1e-12)
                self._current = len(ratio) * torch.softmax(ratio / self.options.temperature, 0)
        return w
