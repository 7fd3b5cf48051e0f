"""Task routing layers (TRL): fixed per-task binary channel masks after each conv(+norm).

Strezoski, van Noord, Worring, "Many Task Learning with Task Routing", ICCV 2019
(arXiv 1903.12117). A TRL multiplies a layer's output channels by the active task's binary
mask. Masks are drawn once, from a seeded generator, and kept as buffers: they are saved in
``state_dict`` and move with ``.to(device)``. The multiply is an ordinary autograd op, so a
masked unit's gradient is exactly zero whatever nonlinearity follows.

Routers are inserted by walking the module tree, so any CNN whose modules register in
forward order (torchvision's and timm's do) can be routed, not only our backbones.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)


def draw_masks(channels: int, num_tasks: int, sigma: float, generator: torch.Generator) -> torch.Tensor:
    """Binary ``[num_tasks, channels]`` masks with sharing ratio ``sigma``.

    Units are shuffled and dealt round-robin to the tasks as their own units, so every unit
    is owned by some task and every task owns at least one (units are reused as evenly as
    possible when tasks outnumber units). Each task then also keeps
    ``round(sigma * (units it does not own))`` of the others, at random. sigma=1 gives all
    ones; sigma=0 gives a partition (when tasks <= channels).
    """
    cpu = torch.device("cpu")  # explicit, so models can also be built on the meta device
    masks = torch.zeros(num_tasks, channels, device=cpu)
    perm = torch.randperm(channels, generator=generator, device=cpu)
    slots = torch.arange(max(channels, num_tasks), device=cpu)
    masks[slots % num_tasks, perm[slots % channels]] = 1.0
    for t in range(num_tasks):
        others = (masks[t] == 0).nonzero().flatten()
        keep = round(sigma * len(others))
        if keep:
            pick = others[torch.randperm(len(others), generator=generator, device=cpu)[:keep]]
            masks[t, pick] = 1.0
    return masks


class TaskRoute(nn.Module):
    """Multiplies channels (dim 1) by the active task's mask. ``task`` is set by the model."""

    def __init__(self, masks: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("masks", masks)
        self.task = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = self.masks[self.task]
        return x * mask.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        tasks, channels = self.masks.shape
        return f"tasks={tasks}, channels={channels}, kept={self.masks.mean().item():.3f}"


class Routed(nn.Sequential):
    """The original layer followed by its router; replaces the layer in its parent.

    A batch norm's running statistics are updated only for the channels the active task
    keeps: a unit's statistics come from the tasks routed through it. (Standard batch norm
    would also update dropped units from a task that never uses them; this choice also
    makes the compact implementation exactly equivalent, see ``mtlbench.compact``.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer, route = self[0], self[1]
        if not (self.training and is_tracking_batch_norm(layer)):
            return route(layer(x))
        # Normalise with copies of the running statistics (autograd keeps the tensors it was
        # given, so the buffers themselves must not be changed in place), then keep the
        # copies' update only where the task keeps the unit.
        mean, var = layer.running_mean.clone(), layer.running_var.clone()
        y = F.batch_norm(x, mean, var, layer.weight, layer.bias, True, momentum_step(layer), layer.eps)
        keep = route.masks[route.task] > 0
        with torch.no_grad():
            layer.running_mean.copy_(torch.where(keep, mean, layer.running_mean))
            layer.running_var.copy_(torch.where(keep, var, layer.running_var))
        return route(y)


def is_tracking_batch_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats \
        and layer.running_mean is not None


def momentum_step(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count one training batch and return the momentum to use for it (as nn.BatchNorm does)."""
    bn.num_batches_tracked.add_(1)
    return 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum


def route_points(module: nn.Module, prefix: str = "") -> list[tuple[nn.Module, str, str, int]]:
    """Where routers go: (parent, child name, qualified name, channels), in forward order.

    After each conv followed directly by a norm (the router goes after the norm, before the
    nonlinearity), or after a conv with no norm after it.
    """
    points = []
    children = list(module.named_children())
    for i, (name, child) in enumerate(children):
        qual = f"{prefix}{name}"
        if isinstance(child, nn.Conv2d):
            nxt = children[i + 1] if i + 1 < len(children) else None
            if nxt is not None and isinstance(nxt[1], NORM_TYPES):
                points.append((module, nxt[0], f"{prefix}{nxt[0]}", child.out_channels))
            else:
                points.append((module, name, qual, child.out_channels))
        elif not isinstance(child, NORM_TYPES) and len(list(child.children())):
            points += route_points(child, prefix=f"{qual}.")
    return points


def insert_routers(model: nn.Module, num_tasks: int, sigma: float, seed: int) -> tuple[list[TaskRoute], list[str]]:
    """Insert a :class:`TaskRoute` at every route point of ``model``, in place.

    Returns the routers and the qualified names of the layers they follow.
    """
    generator = torch.Generator().manual_seed(seed)
    routers, names = [], []
    for parent, child_name, qual, channels in route_points(model):
        router = TaskRoute(draw_masks(channels, num_tasks, sigma, generator))
        setattr(parent, child_name, Routed(getattr(parent, child_name), router))
        routers.append(router)
        names.append(qual)
    return routers, names
