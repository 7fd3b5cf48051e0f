"""Hard parameter sharing (``hard``): one shared backbone, one linear head per task.

Caruana, "Multitask Learning", Machine Learning 28, 1997. The sigma=1 end of Task
Routing's sharing axis: one forward pass yields every head and the task losses are summed
each step (schedule ``all``). With the same weights it gives exactly the outputs of ``tr``
at sigma=1.
"""
from __future__ import annotations

import torch

from mtlbench.backbones import BackboneSpec
from mtlbench.method import Method, MethodConfig, TaskHeads, count
from mtlbench.registry import register_method


@register_method("hard", "Hard parameter sharing: one shared backbone, one head per task, summed losses.")
class HardSharing(Method):
    fixed_sigma = 1.0

    def __init__(self, backbone: BackboneSpec, num_tasks: int, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, config, seed)
        self.backbone = backbone.build()
        self.heads = TaskHeads(self.backbone.num_features, num_tasks)

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        return self.heads(self.backbone(x), tasks)

    def param_counts(self) -> dict:
        return {"trainable": count(self), "shared": count(self.backbone), "task_specific": count(self.heads)}
