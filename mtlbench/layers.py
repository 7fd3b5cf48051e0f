"""Generic network helpers shared by methods: the module-tree walk, shapes, norms, budgets.

Nothing here knows a method. Task routing's layers, masks and compact forms live with the
method (``mtlbench.methods.tr``); what they share with other methods is here.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

NORM_TYPES = (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d, nn.LayerNorm)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity,
               nn.Dropout)


def insertion_points(module: nn.Module, prefix: str = "") -> list[tuple[nn.Module, str, str, int]]:
    """Where a per-channel layer goes after each convolution: (parent, child name, qualified
    name, channels), in forward order.

    After each conv followed directly by a norm (the new layer goes after the norm, before the
    nonlinearity), or after a conv with no norm after it. Works on any CNN whose modules are
    registered in forward order (torchvision's and timm's are).
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
            points += insertion_points(child, prefix=f"{qual}.")
    return points


def is_tracking_batch_norm(layer: nn.Module) -> bool:
    return isinstance(layer, nn.modules.batchnorm._BatchNorm) and layer.track_running_stats \
        and layer.running_mean is not None


def momentum_step(bn: nn.modules.batchnorm._BatchNorm, counter: torch.Tensor | None = None) -> float:
    """Count one training batch (in ``counter``, default the norm's own) and return the momentum
    to use for it, as ``nn.BatchNorm`` does (``momentum=None``: a cumulative average)."""
    counter = bn.num_batches_tracked if counter is None else counter
    counter.add_(1)
    return 1.0 / float(counter) if bn.momentum is None else bn.momentum


@contextlib.contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run a forward in training mode without letting it change any buffer (running statistics):
    for an extra look at the losses after a step (FAMO) that must not count as a batch."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, v in saved:
                b.copy_(v)


# Activation budget of one grouped call (tr's all-task inference, stl's grouped columns): it
# sets how many tasks or columns one call holds, so memory stays bounded as T grows. Chosen
# from the figures of ``python tests/benchmarks/auto_rules.py --device cpu|cuda``.
GROUP_BYTES = {"cpu": 64 << 20, "cuda": 1 << 30}


def group_size(bytes_per_member: int, members: int, device: torch.device | str) -> int:
    """How many tasks (or columns) of ``bytes_per_member`` activations one grouped call holds."""
    budget = GROUP_BYTES.get(torch.device(device).type, GROUP_BYTES["cpu"])
    return max(1, min(members, budget // max(bytes_per_member, 1)))


def conv_outputs(modules, height: int, width: int) -> list[int]:
    """Per image, the elements of each conv's output as ``modules`` run in order from an
    input of ``height x width`` (convs and pools change the size; other modules don't)."""
    sizes = []
    for m in modules:
        if isinstance(m, nn.Conv2d):
            if m.padding != "same":
                pad = (0, 0) if m.padding == "valid" else m.padding
                height, width = (_out(n, k, s, p, d) for n, k, s, p, d in
                                 zip((height, width), m.kernel_size, m.stride, pad, m.dilation))
            sizes.append(m.out_channels * height * width)
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            k, p, s = _pair(m.kernel_size), _pair(m.padding), _pair(m.stride or m.kernel_size)
            height, width = (_out(n, k_, s_, p_, 1) for n, k_, s_, p_ in zip((height, width), k, s, p))
    return sizes


def _pair(v) -> tuple[int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _out(n: int, kernel: int, stride: int, pad: int, dilation: int) -> int:
    return max(1, (n + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1)
