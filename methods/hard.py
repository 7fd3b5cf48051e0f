"""Hard parameter sharing (``hard``): one shared backbone, one linear head per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997. The sigma=1 end of Task
Routing's sharing axis: one forward pass yields every head and the task losses are combined
each step (schedule ``all``) by the run's task weighting (``ew``: summed). With the same
weights it gives exactly the outputs of ``tr`` at sigma=1.
"""
from __future__ import annotations

from typing import Callable

import torch

from mtlbench.backbones import BackboneSpec
from mtlbench.method import Method, TaskHeads, WeightedOptions, count
from mtlbench.registry import register_method


@register_method("hard", "Hard parameter sharing: one shared backbone, one head per task, combined losses.")
class HardSharing(Method):
    options_class = WeightedOptions
    same_as = ("tr", {"sigma": 1.0})

    def __init__(self, backbone: BackboneSpec, num_tasks: int, options: WeightedOptions, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, options, seed)
        self.backbone = backbone.build()
        self.heads = TaskHeads(self.backbone.num_features, num_tasks)

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        return self.heads(self.backbone(x), tasks)

    def representation(self, x: torch.Tensor, tasks: list[int]) -> tuple[torch.Tensor, Callable]:
        return self.backbone(x), lambda z: self.heads(z, tasks)

    def param_counts(self) -> dict:
        return {"trainable": count(self), "shared": count(self.backbone), "task_specific": count(self.heads)}
