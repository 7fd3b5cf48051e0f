"""Compact task routing: run only a task's active channels, through gathered weights.

A routed task uses only the units its masks keep, so its sub-network is a smaller dense
network: at kept fraction k a conv costs about k² of the full one. The masked dense form
computes every channel and multiplies the dropped ones by zero. Here each conv's weight is
gathered (``index_select``) to the task's active output and input channels, and each norm's
parameters and running statistics (the task's own row under ``bn_stats=task``) to its active
channels; gradients flow back into the full weights through the gathers, so dropped units get
exactly zero gradient, as in the dense form. The masked dense form stays the reference
(``-o method.impl=dense``); tests check that both give the same outputs, losses, gradients and
running statistics.

Supported backbones: a plain chain of Conv2d -> routed norm -> elementwise activation /
pooling (``convnet``, ``vgg11``). Anything else (residual timm models) runs dense, and so does
``bn_stats=all``, whose statistics cover units the compact form never computes.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.layers import ELEMENTWISE, is_tracking_batch_norm, momentum_step
from mtlbench.methods.tr.routing import Routed

# Compute channel counts in multiples of this. CPU batch-norm kernels in channels_last run
# several times slower on odd channel counts; the figures behind the choice are printed by
# ``python tests/benchmarks/compact_bound.py``.
PAD = 8


def chain(backbone: nn.Module) -> list[nn.Module] | None:
    """The backbone's leaf modules in forward order, or None if it is not a plain chain."""
    blocks = getattr(backbone, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return None
    leaves = [m for block in blocks for m in (block if isinstance(block, nn.Sequential) else [block])]
    for i, m in enumerate(leaves):
        if isinstance(m, nn.Conv2d):
            nxt = leaves[i + 1] if i + 1 < len(leaves) else None
            if m.groups != 1 or not (isinstance(nxt, Routed) and isinstance(nxt[0], nn.BatchNorm2d)):
                return None
        elif not isinstance(m, (Routed, *ELEMENTWISE)):
            return None
    return leaves


class CompactRouting:
    """Per-task compact forward over a routed plain-chain backbone (holds no parameters)."""

    def __init__(self, leaves: list[nn.Module]) -> None:
        self.leaves = leaves
        self._active: dict[tuple, list[torch.Tensor]] = {}
        # where the per-task part starts when several tasks share the first layer
        self._second_conv = next((i for i, m in enumerate(leaves) if i and isinstance(m, nn.Conv2d)), None)

    def supported(self) -> bool:
        """``bn_stats=all`` updates dropped units' statistics, which compact never computes."""
        return all(m.rule != "all" for m in self.leaves if isinstance(m, Routed))

    def active(self, task: int, device: torch.device, pad: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per routed layer: the channels to compute and, if some are padding, which are kept.

        The kept channels are padded with dropped ones up to a multiple of ``pad``. Padding
        channels are zeroed by the norm (scale and shift multiplied by 0), as the dense form's
        mask would, so they get zero gradient and their running statistics are left alone.
        """
        key = (task, device, pad)
        if key not in self._active:
            self._active[key] = [self._padded(m[1].masks[task], device, pad) for m in self.leaves
                                 if isinstance(m, Routed)]
        return self._active[key]

    @staticmethod
    def _padded(mask: torch.Tensor, device: torch.device, pad: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        kept, dropped = (mask > 0).nonzero().flatten(), (mask == 0).nonzero().flatten()
        size = min(len(mask), -(-len(kept) // pad) * pad)
        idx = torch.cat([kept, dropped[:size - len(kept)]]).sort().values
        keep = mask[idx] > 0
        return idx.to(device), (None if bool(keep.all()) else keep.to(device))

    def forward(self, x: torch.Tensor, task: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features of the task's active last-layer channels, and those channels."""
        # Padding pays for itself in the batch-norm backward; inference needs none.
        active = self.active(task, x.device, PAD if torch.is_grad_enabled() else 1)
        return self._run(x, active, task, start=0)

    def _run(self, x: torch.Tensor, active: list, task: int, start: int, layer: int = 0,
             idx_in: torch.Tensor | None = None, keep_in: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run leaves ``start..`` for one task whose input holds channels ``idx_in`` of the
        previous layer (``keep_in``: which of them the task keeps; the rest are zeroed)."""
        out, keep = None, None
        for m in self.leaves[start:]:
            if isinstance(m, nn.Conv2d):
                out, keep = active[layer]
                w = m.weight.index_select(0, out)
                if idx_in is not None:
                    w = w.index_select(1, idx_in)
                if keep_in is not None:  # inputs the task drops must not reach it
                    w = w * keep_in.view(1, -1, 1, 1).to(w.dtype)
                b = m.bias.index_select(0, out) if m.bias is not None else None
                if x.is_contiguous(memory_format=torch.channels_last):
                    w = w.contiguous(memory_format=torch.channels_last)  # one layout for mkldnn
                x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation)
                keep_in = None
            elif isinstance(m, Routed):
                x = self._norm(m, task, x, out, keep)
                idx_in, layer = out, layer + 1
            else:
                x = m(x)
        return x.mean(dim=(2, 3)), idx_in

    def forward_many(self, x: torch.Tensor, tasks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` for several tasks on one batch, sharing the first layer.

        Every task sees the same images, so the first conv, its batch norm (batch statistics
        are per channel, whichever task computes them; the first norm's running statistics
        are shared, its input not depending on the task) and what follows up to the second
        conv are the same for all tasks on the channels they keep: computed once at full
        width, then each task takes its channels. The running statistics get each task's
        update in turn, on the units that task keeps, exactly as one pass per task would.
        """
        second, conv, routed = self._second_conv, self.leaves[0], self.leaves[1]
        if second is None or conv.bias is not None or routed.per_task:
            return [self.forward(x, t) for t in tasks]
        pad = PAD if torch.is_grad_enabled() else 1
        h = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
        h = self._shared_norm(routed, h, tasks)
        for m in self.leaves[2:second]:
            h = m(h)
        # Each task's second conv reads the full first layer with zero weights on the channels
        # the task drops (cheaper here than gathering activations, whose backward scatters).
        masks = routed[1].masks > 0
        return [self._run(h, self.active(t, x.device, pad), t, start=second, layer=1, keep_in=masks[t])
                for t in tasks]

    @staticmethod
    def _shared_norm(routed: Routed, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        bn, route = routed[0], routed[1]
        if not (bn.training and is_tracking_batch_norm(bn)):
            return bn(x)
        # momentum 1 turns the buffers passed in into this batch's mean and unbiased variance
        mean, var = torch.zeros_like(bn.running_mean), torch.zeros_like(bn.running_var)
        y = F.batch_norm(x, mean, var, bn.weight, bn.bias, True, 1.0, bn.eps)
        with torch.no_grad():
            for t in tasks:  # each task's update in turn, on the units it keeps
                m, keep = momentum_step(bn), route.masks[t] > 0
                bn.running_mean.copy_(torch.where(keep, bn.running_mean * (1 - m) + mean * m, bn.running_mean))
                bn.running_var.copy_(torch.where(keep, bn.running_var * (1 - m) + var * m, bn.running_var))
        return y

    @staticmethod
    def _norm(routed: Routed, task: int, x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None
              ) -> torch.Tensor:
        """Batch norm on the computed channels; only kept ones update running statistics."""
        bn = routed[0]
        weight, bias = bn.weight.index_select(0, idx), bn.bias.index_select(0, idx)
        if keep is not None:  # padding channels: scale and shift 0 make them exactly 0, with
            weight, bias = weight * keep, bias * keep  # zero gradient, at the cost of a vector
        if not is_tracking_batch_norm(bn):
            return F.batch_norm(x, None, None, weight, bias, True, 0.0, bn.eps)
        running_mean, running_var, counter = routed.statistics(task)
        mean, var = running_mean.index_select(0, idx), running_var.index_select(0, idx)
        if not bn.training:
            return F.batch_norm(x, mean, var, weight, bias, False, 0.0, bn.eps)
        y = F.batch_norm(x, mean, var, weight, bias, True, momentum_step(bn, counter), bn.eps)
        with torch.no_grad():
            if keep is not None:
                mean = torch.where(keep, mean, running_mean.index_select(0, idx))
                var = torch.where(keep, var, running_var.index_select(0, idx))
            running_mean.index_copy_(0, idx, mean)
            running_var.index_copy_(0, idx, var)
        return y
