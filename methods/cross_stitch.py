"""Cross-stitch networks (``cross-stitch``): one column per task, linearly mixed after each block.

Misra, Shrivastava, Gupta, Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR
2016, arXiv 1604.03539.

Implemented: one full backbone column per task and a cross-stitch unit after each conv
block, x̃_i = Σ_j α_ij ⊙ x_j with a trainable per-channel α of shape ``[T, T, C]``,
initialised to 0.9 on the diagonal and 0.1/(T-1) off it (each row sums to 1). Every task
runs each step (schedule ``all``; the losses are combined by the run's task weighting). The mixing is one einsum over the task axis per block. Parameters grow as
T·backbone + blocks·T²·channels, which :meth:`CrossStitch.param_counts` reports.

Deviations: the paper stitches two tasks' AlexNets after pooling layers; here any number of
tasks is stitched after every block of the shared backbone definition, and the paper's
larger learning rate for α is not used (one optimiser setting for every method).
"""
from __future__ import annotations

import torch
from torch import nn

from mtlbench.backbones import BackboneSpec
from mtlbench.method import TaskHeads, count
from mtlbench.methods.columns import ColumnsMethod, WeightedColumnsOptions
from mtlbench.registry import register_method


def stitch_init(num_tasks: int, channels: int) -> torch.Tensor:
    off = 0.1 / (num_tasks - 1) if num_tasks > 1 else 0.0
    alpha = torch.full((num_tasks, num_tasks), off)
    alpha.fill_diagonal_(0.9 if num_tasks > 1 else 1.0)
    return alpha[:, :, None].expand(-1, -1, channels).clone()


def stitch(alpha: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """``alpha [T, T, C]``, ``xs [T, B, C, H, W]`` -> mixed ``[T, B, C, H, W]``."""
    return torch.einsum("ijc,jbchw->ibchw", alpha, xs)


@register_method("cross-stitch", "Cross-stitch networks: a column per task, mixed by trainable alpha after each block.")
class CrossStitch(ColumnsMethod):
    options_class = WeightedColumnsOptions

    def __init__(self, backbone: BackboneSpec, num_tasks: int, options: WeightedColumnsOptions, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, options, seed)
        self.columns = nn.ModuleList(backbone.build() for _ in range(num_tasks))
        channels = self.columns[0].block_channels
        self.alphas = nn.ParameterList(nn.Parameter(stitch_init(num_tasks, c)) for c in channels)
        self.heads = TaskHeads(self.columns[0].num_features, num_tasks)
        self.init_columns()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features of every column, ``[T, B, F]``."""
        if self.column_impl == "grouped":
            return self._features_grouped(x)
        xs = None
        for b, alpha in enumerate(self.alphas):
            inputs = [x] * self.num_tasks if xs is None else xs.unbind(0)
            xs = stitch(alpha, torch.stack([col.blocks[b](xi) for col, xi in zip(self.columns, inputs)]))
        return xs.mean(dim=(3, 4))

    def _features_grouped(self, x: torch.Tensor) -> torch.Tensor:
        """The same, with each block of all columns as one grouped network."""
        h, cl = x, x.is_contiguous(memory_format=torch.channels_last)
        for b, alpha in enumerate(self.alphas):
            h = self.grouped.block(b, h, shared=b == 0)
            mixed = torch.einsum("ijc,bjchw->bichw", alpha, self.grouped.columns_view(h))
            h = mixed.flatten(1, 2)
            if cl:
                h = h.contiguous(memory_format=torch.channels_last)
        return self.grouped.columns_view(h.mean(dim=(2, 3))[..., None, None]).flatten(2).transpose(0, 1)

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        feats = self.features(x)
        return torch.stack([self.heads.one(feats[t], t) for t in tasks], dim=1)

    def describe(self) -> dict:
        return {**self.describe_columns(), "stitch": "one einsum over the task axis per block"}

    @classmethod
    def bench_figures(cls, bench) -> dict:
        """Step time per task as T grows, and loop over grouped columns for ``AUTO_COLUMNS``."""
        steps = {str(t): bench.train_step(*bench.model("cross-stitch", t)) for t in bench.shape.cross_stitch_tasks}
        times = bench.turns(**steps)
        tasks = bench.shape.cross_stitch_tasks[0]
        grouped = {impl: bench.train_step(*bench.model("cross-stitch", tasks, columns=impl)) for impl in ("loop", "grouped")}
        return {"cross_stitch_step_s_per_task": {t: bench.median(times[t]) / int(t) for t in steps},
                "columns_grouped_speedup": {f"cross_stitch_step_T{tasks}": bench.ratio(grouped, "loop", "grouped")}}

    def param_counts(self) -> dict:
        stitches = sum(a.numel() for a in self.alphas)
        return {
            "trainable": count(self),
            "shared": stitches,
            "task_specific": count(self.columns) + count(self.heads),
            "cross_stitch": stitches,
            "per_column": count(self.columns[0]),
        }
