"""Single-task learning (``stl``): T independent full backbones, one per task.

The reference every Δm is measured against (registered with ``reference=True``). Each task's
network is trained only on its own task, for the same budget every other method gives that
task, one network per step in turn (schedule ``round-robin``). The
networks live in one module for convenience, but share nothing: a step on task i leaves
network j's parameters (and, since optimisers skip parameters without gradients, its
optimiser state) untouched.
"""
from __future__ import annotations

import torch
from torch import nn

from mtlbench.backbones import BackboneSpec
from mtlbench.layers import group_size
from mtlbench.method import TaskHeads, count
from mtlbench.methods.columns import ColumnsMethod, ColumnsOptions
from mtlbench.registry import register_method


@register_method("stl", "Single-task learning: T independent backbones, each trained on its own task only.",
                 reference=True)
class SingleTask(ColumnsMethod):
    schedules = ("round-robin",)

    def __init__(self, backbone: BackboneSpec, num_tasks: int, options: ColumnsOptions, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, options, seed)
        self.columns = nn.ModuleList(backbone.build() for _ in range(num_tasks))
        # One head module per task (not one stacked tensor), so Adam's momentum from task j's
        # steps never moves task i's head: the networks are fully independent.
        self.heads = nn.ModuleList(TaskHeads(col.num_features, 1) for col in self.columns)
        self.init_columns()

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        if self.column_impl == "grouped" and list(tasks) == list(range(self.num_tasks)):
            return self._all_grouped(x)
        # Training steps supervise one task (one column): nothing to group.
        return torch.stack([self.heads[t].one(self.columns[t](x), 0) for t in tasks], dim=1)

    def _all_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """Every column, as few grouped calls as the activation budget allows (memory stays
        bounded as T grows: see mtlbench.layers.GROUP_BYTES)."""
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

    def task_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]  # every network is one task's

    def param_counts(self) -> dict:
        return {"trainable": count(self), "shared": 0, "task_specific": count(self)}

    @classmethod
    def bench_figures(cls, bench) -> dict:
        """Loop over grouped all-task inference (>1: grouped wins), for ``AUTO_COLUMNS``."""
        tasks = bench.shape.cross_stitch_tasks[0]
        predict = {impl: bench.predict_all(bench.model("stl", tasks, columns=impl)[1].eval())
                   for impl in ("loop", "grouped")}
        return {"columns_grouped_speedup": {f"stl_all_task_inference_T{tasks}": bench.ratio(predict, "loop", "grouped")}}
