"""Single-task learning (``stl``): T independent full backbones, one per task.

The reference every Δm is measured against. Each task's network is trained only on its own
task, for the same ``steps_per_task`` batches every other method gives that task. The
networks live in one module for convenience, but share nothing: a step on task i leaves
network j's parameters (and, since optimisers skip parameters without gradients, its
optimiser state) untouched.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from mtlbench.backbones import BackboneSpec
from mtlbench.columns import ColumnsMethod
from mtlbench.compact import group_size
from mtlbench.method import MethodConfig, TaskHeads, count
from mtlbench.registry import register_method


@register_method("stl", "Single-task learning: T independent backbones, each trained on its own task only.")
class SingleTask(ColumnsMethod):
    def __init__(self, backbone: BackboneSpec, num_tasks: int, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, config, seed)
        self.columns = nn.ModuleList(backbone.build() for _ in range(num_tasks))
        # One head module per task (not one stacked tensor), so Adam's momentum from task j's
        # steps never moves task i's head: the networks are fully independent.
        self.heads = nn.ModuleList(TaskHeads(col.num_features, 1) for col in self.columns)
        self.init_columns()

    def schedule(self, steps_per_task: int, generator: torch.Generator) -> Iterator[list[int]]:
        # Round-robin keeps every network at the same point of its budget at any moment.
        for _ in range(steps_per_task):
            for t in range(self.num_tasks):
                yield [t]

    @classmethod
    def total_steps(cls, num_tasks: int, steps_per_task: int, schedule: str) -> int:
        return steps_per_task * num_tasks

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        if self.column_impl == "grouped" and list(tasks) == list(range(self.num_tasks)):
            return self._all_grouped(x)
        # Training steps supervise one task (one column): nothing to group.
        return torch.stack([self.heads[t].one(self.columns[t](x), 0) for t in tasks], dim=1)

    def _all_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Every column, as few grouped calls as the activation budget allows (memory stays
        bounded as T grows: see mtlbench.compact.GROUP_BYTES)."""
        per_column = x.shape[0] * self.grouped.activation_elements(x) * x.element_size()
        step = group_size(per_column, self.num_tasks, x.device)
        return torch.cat([self._grouped_part(x, i, min(i + step, self.num_tasks))
                          for i in range(0, self.num_tasks, step)], dim=1)

    def _grouped_part(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        grouped = self.grouped if stop - start == self.num_tasks else self.grouped.part(start, stop)
        h = x
        for b in range(len(self.columns[0].blocks)):
            h = grouped.block(b, h, shared=b == 0)
        features = grouped.columns_view(h.mean(dim=(2, 3)).unsqueeze(-1).unsqueeze(-1)).flatten(2)  # [B, t, F]
        weight = torch.cat([head.weight for head in self.heads[start:stop]])  # [t, F]
        bias = torch.cat([head.bias for head in self.heads[start:stop]])
        return (features * weight).sum(dim=-1) + bias

    def describe(self) -> dict:
        return {**self.describe_columns(), "grouped_used_for": "all-task inference (training steps use one column)"}

    def param_counts(self) -> dict:
        return {"trainable": count(self), "shared": 0, "task_specific": count(self)}
