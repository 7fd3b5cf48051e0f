"""Task routing layers (TRL): fixed per-task binary channel masks after each conv(+norm).

Strezoski, van Noord, Worring, "Many Task Learning with Task Routing", ICCV 2019
(arXiv 1903.12117). A TRL multiplies a layer's output channels by the active task's binary
mask. Masks are drawn once, from a seeded generator, and kept as buffers: they are saved in
``state_dict`` and move with ``.to(device)``. The multiply is an ordinary autograd op, so a
masked unit's gradient is exactly zero whatever nonlinearity follows.

Routers are inserted by the generic module-tree walk (:func:`mtlbench.layers.insertion_points`),
so any CNN whose modules register in forward order (torchvision's and timm's do) can be
routed, not only the built-in backbones.

**Batch-norm statistics** (``bn_stats``). Once a router earlier in the network gives tasks
different masks, the input of every later norm depends on the active task, so one running
mean and variance per unit, averaged over the tasks, fits none of them at evaluation. Three
rules:

- ``task`` (the default): a routed norm whose input depends on the task keeps one row of
  statistics per task (``task_mean``/``task_var``, ``[T, C]``), updated only by that task's
  batches on the units it keeps, and used in eval mode for that task. A norm with no router
  before it that differs between tasks (the first one, which reads the image, and every norm
  at sigma=1) keeps the layer's own statistics: its input is the same for every task.
- ``kept``: one set of statistics per unit, updated only by batches of tasks that keep it.
- ``all``: the plain norm: every task's batches update every unit, as in the official code,
  where the norm sits before the router.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.layers import insertion_points, is_tracking_batch_norm, momentum_step
from mtlbench.methods.tr.masks import draw_masks

BN_STATS = ("task", "kept", "all")


class TaskRoute(nn.Module):
    """Multiplies channels by the active task's mask. ``task`` is set by the model. Channels
    are dim 1, or the last dim after a norm that runs channels-last (ConvNeXt's LayerNorm)."""

    def __init__(self, masks: torch.Tensor, channels_last: bool = False) -> None:
        super().__init__()
        self.register_buffer("masks", masks)
        self.task = 0
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.task]
        if self.channels_last:
            return x * mask
        return x * mask.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        tasks, channels = self.masks.shape
        return f"tasks={tasks}, channels={channels}, kept={self.masks.mean().item():.3f}"


class Routed(nn.Sequential):
    """The original layer followed by its router; replaces the layer in its parent.

    ``per_task``: this norm keeps a row of running statistics per task (rule ``task``, input
    depending on the task). ``rule``: one of :data:`BN_STATS`.
    """

    def __init__(self, layer: nn.Module, route: TaskRoute, rule: str = "task", per_task: bool = False) -> None:
        super().__init__(layer, route)
        self.rule = rule
        self.per_task = bool(per_task and is_tracking_batch_norm(layer))
        if self.per_task:
            tasks, channels = route.masks.shape
            self.register_buffer("task_mean", torch.zeros(tasks, channels, device=layer.running_mean.device))
            self.register_buffer("task_var", torch.ones(tasks, channels, device=layer.running_var.device))
            self.register_buffer("task_batches", torch.zeros(tasks, dtype=torch.long,
                                                             device=layer.running_mean.device))

    def statistics(self, task: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The running mean, variance and batch counter ``task`` uses (views: writes land in
        the buffers)."""
        if self.per_task:
            return self.task_mean[task], self.task_var[task], self.task_batches[task]
        bn = self[0]
        return bn.running_mean, bn.running_var, bn.num_batches_tracked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, route = self[0], self[1]
        if self.rule == "all" or not is_tracking_batch_norm(layer):
            return route(layer(x))
        mean, var, counter = self.statistics(route.task)
        if not self.training:
            return route(_after_norm(layer, F.batch_norm(x, mean, var, layer.weight, layer.bias, False, 0.0,
                                                         layer.eps)))
        # Normalise with copies of the running statistics (autograd keeps the tensors it was
        # given, so the buffers themselves must not be changed in place), then keep the
        # copies' update only where the task keeps the unit.
        new_mean, new_var = mean.clone(), var.clone()
        y = F.batch_norm(x, new_mean, new_var, layer.weight, layer.bias, True, momentum_step(layer, counter),
                         layer.eps)
        keep = route.masks[route.task] > 0
        with torch.no_grad():
            mean.copy_(torch.where(keep, new_mean, mean))
            var.copy_(torch.where(keep, new_var, var))
        return route(_after_norm(layer, y))


def _after_norm(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """What a norm-and-activation layer (timm's ``BatchNormAct2d``) applies after its norm:
    dropout, then the activation. The router then follows the activation, which gives the
    same output as routing before it: a binary mask commutes with any activation f with
    f(0) = 0 (ReLU, SiLU, GELU, hard-swish)."""
    drop, act = getattr(layer, "drop", None), getattr(layer, "act", None)
    if isinstance(drop, nn.Module):
        y = drop(y)
    if isinstance(act, nn.Module):
        y = act(y)
    return y


def runs_channels_last(layer: nn.Module) -> bool:
    """A plain ``nn.LayerNorm`` after a conv normalises the last dim: the block has permuted
    to channels-last (ConvNeXt), so the router must mask the last dim too."""
    return isinstance(layer, nn.LayerNorm) and type(layer).forward is nn.LayerNorm.forward


def insert_routers(model: nn.Module, num_tasks: int, sigma: float, seed: int, masks: str = "own",
                   bn_stats: str = "task") -> tuple[list[TaskRoute], list[Routed], list[str]]:
    """Insert a :class:`TaskRoute` at every insertion point of ``model``, in place.

    Returns the routers, the :class:`Routed` wrappers and the qualified names of the layers
    they follow, in forward order.
    """
    generator = torch.Generator().manual_seed(seed)
    routers, wrappers, names = [], [], []
    upstream_differs = False  # does a router before this point give tasks different masks?
    for parent, child_name, qual, channels in insertion_points(model):
        layer = getattr(parent, child_name)
        router = TaskRoute(draw_masks(channels, num_tasks, sigma, generator, rule=masks), runs_channels_last(layer))
        wrapped = Routed(layer, router, bn_stats,
                         per_task=bn_stats == "task" and upstream_differs)
        setattr(parent, child_name, wrapped)
        upstream_differs = upstream_differs or not bool((router.masks == router.masks[:1]).all())
        routers.append(router)
        wrappers.append(wrapped)
        names.append(qual)
    return routers, wrappers, names
