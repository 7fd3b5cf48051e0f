"""Compact task routing: run only a task's active channels, through gathered weights.

A routed task uses only the units its masks keep, so its sub-network is a smaller dense
network: at kept fraction k a conv costs about k² of the full one. The masked dense form
computes every channel and multiplies the dropped ones by zero. Here each conv's weight is
gathered (``index_select``) to the task's active output and input channels, and each norm's
parameters and running statistics to its active channels; gradients flow back into the full
weights through the gathers, so dropped units get exactly zero gradient, as in the dense
form. The masked dense form stays the reference (``--tr-impl dense``); tests check that both
give the same outputs, losses, gradients and running statistics.

Supported backbones: a plain chain of Conv2d -> routed norm -> elementwise activation /
pooling (``convnet``, ``vgg11``). Anything else (residual timm models) runs dense.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.routing import Routed, is_tracking_batch_norm, momentum_step

PAD = 8  # compute channel counts in multiples of this (see CompactRouting.active)
ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d, nn.Identity,
               nn.Dropout)


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

    def active(self, task: int, device: torch.device, pad: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per routed layer: the channels to compute and, if some are padding, which are kept.

        The kept channels are padded with dropped ones up to a multiple of ``PAD``: CPU
        batch-norm kernels in channels_last run several times slower on odd channel counts
        (17 channels: 5.3 ms for a batch-norm backward that takes 1.0 ms at 16; torch
        2.14, 2-core CPU). 8 measured best among 1, 8 and 16 for the default backbone. Padding
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
        idx_in, layer, out, keep = None, 0, None, None
        # Padding pays for itself in the batch-norm backward; inference needs none.
        active = self.active(task, x.device, PAD if torch.is_grad_enabled() else 1)
        for m in self.leaves:
            if isinstance(m, nn.Conv2d):
                out, keep = active[layer]
                w = m.weight.index_select(0, out)
                if idx_in is not None:
                    w = w.index_select(1, idx_in)
                b = m.bias.index_select(0, out) if m.bias is not None else None
                if x.is_contiguous(memory_format=torch.channels_last):
                    w = w.contiguous(memory_format=torch.channels_last)  # one layout for mkldnn
                x = F.conv2d(x, w, b, m.stride, m.padding, m.dilation)
            elif isinstance(m, Routed):
                x = self._norm(m[0], x, out, keep)
                idx_in, layer = out, layer + 1
            else:
                x = m(x)
        return x.mean(dim=(2, 3)), idx_in

    @staticmethod
    def _norm(bn: nn.BatchNorm2d, x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
        """Batch norm on the computed channels; only kept ones update running statistics."""
        weight, bias = bn.weight.index_select(0, idx), bn.bias.index_select(0, idx)
        if keep is not None:  # padding channels: scale and shift 0 make them exactly 0, with
            weight, bias = weight * keep, bias * keep  # zero gradient, at the cost of a vector
        if not (bn.training and is_tracking_batch_norm(bn)):
            stats = (None, None) if bn.running_mean is None else \
                (bn.running_mean.index_select(0, idx), bn.running_var.index_select(0, idx))
            return F.batch_norm(x, *stats, weight, bias, bn.training or stats[0] is None, 0.0, bn.eps)
        mean, var = bn.running_mean.index_select(0, idx), bn.running_var.index_select(0, idx)
        y = F.batch_norm(x, mean, var, weight, bias, True, momentum_step(bn), bn.eps)
        with torch.no_grad():
            if keep is not None:
                mean = torch.where(keep, mean, bn.running_mean.index_select(0, idx))
                var = torch.where(keep, var, bn.running_var.index_select(0, idx))
            bn.running_mean.index_copy_(0, idx, mean)
            bn.running_var.index_copy_(0, idx, var)
        return y
