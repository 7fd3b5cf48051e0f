"""Many columns (``stl``, ``cross-stitch``): T copies of one backbone, run as a loop or grouped.

The loop runs each column's modules in turn. The grouped form runs one block of every
column as one network: the columns' conv weights are concatenated and applied as one
convolution (``groups = T`` once the columns' inputs differ; a plain convolution on the
shared image), their batch norms as one batch norm over ``T x C`` channels, and the
activation and pooling once on the stacked channels. Column ``c`` lives in channels
``c*C .. (c+1)*C - 1``. The parameters stay in the columns (state dicts, optimiser state and
stl's independence are unchanged); gradients reach them through the concatenation.

Which is faster depends on the device: on a CPU the loop's T calls cost little next to the
work in each, on a GPU T small kernel launches are the cost. ``auto`` follows
:data:`AUTO_COLUMNS`; ``mtlbench bench`` prints the ratio on any device
(``columns_grouped_speedup``), ``tests/benchmarks/auto_rules.py`` the figures behind the rule.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.errors import MtlbenchError
from mtlbench.layers import ELEMENTWISE, conv_outputs, momentum_step
from mtlbench.method import Method, MethodOptions, WeightedOptions

COLUMN_IMPLS = ("auto", "loop", "grouped")
# The loop on a CPU, grouped on a GPU (see the module docstring for where the figures come from).
AUTO_COLUMNS = {"cpu": "loop", "cuda": "grouped"}


@dataclass
class ColumnsOptions(MethodOptions):
    columns: str = "auto"  # loop, grouped or auto (by device, see AUTO_COLUMNS)


@dataclass
class WeightedColumnsOptions(WeightedOptions):
    columns: str = "auto"


def check_columns(choice: str) -> None:
    if choice not in COLUMN_IMPLS:
        raise MtlbenchError(f"method option columns must be one of {', '.join(COLUMN_IMPLS)}, got {choice!r}")


def resolve_columns(choice: str, device: torch.device | str, grouped: "GroupedColumns | None") -> str:
    """The implementation ``choice`` means on ``device`` (grouped only where supported)."""
    if choice == "auto":
        choice = AUTO_COLUMNS.get(torch.device(device).type, "loop")
    return choice if grouped is not None else "loop"


class ColumnsMethod(Method):
    """Base of methods with one backbone column per task (``self.columns``): the loop or grouped
    choice, resolved per device in :meth:`prepare` and recorded by :meth:`describe_columns`."""

    options_class = ColumnsOptions
    implementation_options = ("columns",)

    @classmethod
    def check_options(cls, options) -> None:
        check_columns(options.columns)

    def init_columns(self) -> None:
        """Call once ``self.columns`` exists."""
        self.grouped = GroupedColumns.build(self.columns)
        if self.options.columns == "grouped" and self.grouped is None:
            raise MtlbenchError("method option columns=grouped needs a backbone of conv/batch-norm/elementwise blocks")
        self.column_impl = resolve_columns(self.options.columns, "cpu", self.grouped)

    def prepare(self, device: torch.device) -> None:
        self.column_impl = resolve_columns(self.options.columns, device, self.grouped)

    def describe_columns(self) -> dict:
        return {"column_impl": self.column_impl, "column_impl_requested": self.options.columns,
                "columns": self.num_tasks}


class GroupedColumns:
    """Runs block ``b`` of every column at once (holds no parameters of its own)."""

    def __init__(self, columns: nn.ModuleList) -> None:
        self.columns = columns
        self.leaves = [[list(block) for block in col.blocks] for col in columns]  # [col][block][i]

    @classmethod
    def build(cls, columns: nn.ModuleList) -> "GroupedColumns | None":
        """None where a block is not a plain Conv2d / BatchNorm2d / elementwise chain."""
        for block in columns[0].blocks:
            if not isinstance(block, nn.Sequential):
                return None
            for m in block:
                if isinstance(m, nn.Conv2d) and m.groups != 1:
                    return None
                if not isinstance(m, (nn.Conv2d, nn.BatchNorm2d, *ELEMENTWISE)):
                    return None
        return cls(columns)

    @property
    def num_columns(self) -> int:
        return len(self.columns)

    def part(self, start: int, stop: int) -> "GroupedColumns":
        """Columns ``start .. stop - 1`` only (to bound the memory of one grouped call)."""
        return GroupedColumns(self.columns[start:stop])

    def activation_elements(self, x: torch.Tensor) -> int:
        """Per image and column, the elements of the largest conv output for input ``x``."""
        return max(conv_outputs((m for block in self.leaves[0] for m in block), x.shape[2], x.shape[3]), default=0)

    def block(self, b: int, x: torch.Tensor, shared: bool) -> torch.Tensor:
        """Block ``b`` of every column: ``x`` is the shared input ``[B, C, H, W]`` (``shared``)
        or the columns' inputs stacked on channels ``[B, T*C, H, W]``; returns ``[B, T*C', H', W']``."""
        groups = 1 if shared else self.num_columns
        for i, first in enumerate(self.leaves[0][b]):
            mods = [col[b][i] for col in self.leaves]
            if isinstance(first, nn.Conv2d):
                w = torch.cat([m.weight for m in mods])
                if x.is_contiguous(memory_format=torch.channels_last):
                    w = w.contiguous(memory_format=torch.channels_last)
                bias = torch.cat([m.bias for m in mods]) if first.bias is not None else None
                x = F.conv2d(x, w, bias, first.stride, first.padding, first.dilation, groups)
                groups = self.num_columns
            elif isinstance(first, nn.BatchNorm2d):
                x = self._norm(mods, x)
            else:
                x = first(x)  # elementwise or pooling: the same on stacked channels
        return x

    @staticmethod
    def _norm(mods: list[nn.BatchNorm2d], x: torch.Tensor) -> torch.Tensor:
        first = mods[0]
        weight = torch.cat([m.weight for m in mods]) if first.affine else None
        bias = torch.cat([m.bias for m in mods]) if first.affine else None
        tracking = first.track_running_stats and first.running_mean is not None
        if not tracking:
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, first.eps)
        mean = torch.cat([m.running_mean for m in mods])
        var = torch.cat([m.running_var for m in mods])
        if not first.training:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, first.eps)
        for m in mods[1:]:  # every column counts the batch; all use the first's momentum
            momentum_step(m)
        momentum = momentum_step(first)
        y = F.batch_norm(x, mean, var, weight, bias, True, momentum, first.eps)
        with torch.no_grad():  # hand each column its share of the updated statistics
            for m, mu, v in zip(mods, mean.chunk(len(mods)), var.chunk(len(mods)), strict=True):
                m.running_mean.copy_(mu)
                m.running_var.copy_(v)
        return y

    def columns_view(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T*C, H, W]`` -> ``[B, T, C, H, W]`` (a view)."""
        return x.unflatten(1, (self.num_columns, -1))

