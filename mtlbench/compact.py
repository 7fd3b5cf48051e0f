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


class AllTaskInference:
    """Every task's logits for a batch in eval mode, at the cost of the compact sub-networks.

    Eval-mode batch norm is an affine map per channel, so it is folded into the conv before
    it (``w * gamma / sqrt(var + eps)``, bias ``beta - mean * gamma / sqrt(var + eps)``).
    The first conv sees the same image for every task, so its full output (every channel,
    then the activation and pooling after it) is computed once and shared; each task's next
    conv reads only the channels the task keeps (its weights are zero on the others). From
    there on each task runs its own kept channels.

    ``loop`` runs the tasks one after another. ``grouped`` runs ``group`` tasks per call:
    the second conv as one convolution over the shared features with all their weights
    stacked, later convs as one grouped convolution (``groups = tasks in the call``), every
    task padded to the largest kept count with zero weights (padding channels stay 0).
    Folded weights are rebuilt whenever a parameter or running statistic changes.
    """

    def __init__(self, compact: CompactRouting) -> None:
        self.compact = compact
        self.layers = self._layers(compact.leaves)
        self._plan: tuple | None = None

    @staticmethod
    def _layers(leaves: list[nn.Module]) -> list[tuple[nn.Conv2d, Routed, list[nn.Module]]]:
        """(conv, routed norm, the modules after it up to the next conv) for each layer."""
        layers = []
        for m in leaves:
            if isinstance(m, nn.Conv2d):
                layers.append((m, None, []))
            elif isinstance(m, Routed):
                layers[-1] = (layers[-1][0], m, [])
            else:
                layers[-1][2].append(m)
        return layers

    def activation_elements(self, x: torch.Tensor) -> int:
        """Per image and task, the elements of the largest activation after the first layer."""
        size, best = x.shape[2] * x.shape[3], 0
        for i, (conv, _, after) in enumerate(self.layers):
            size //= conv.stride[0] * conv.stride[1]
            if i:
                best = max(best, conv.out_channels * size)
            size //= 4 ** sum(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in after)
        return best

    def supported(self) -> bool:
        """Folding needs running statistics (a norm without them uses batch statistics)."""
        return all(r[0].running_mean is not None for _, r, _ in self.layers)

    def _versions(self) -> tuple:
        tensors = [t for conv, routed, _ in self.layers for t in (conv.weight, conv.bias, *routed[0].parameters(),
                                                                  routed[0].running_mean, routed[0].running_var)]
        return tuple((id(t), t._version) for t in tensors if t is not None)

    @staticmethod
    def _fold(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        scale = torch.rsqrt(bn.running_var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        if conv.bias is not None:
            shift = shift + conv.bias * scale
        return conv.weight * scale.view(-1, 1, 1, 1), shift

    def plan(self, memory_format: torch.memory_format) -> tuple[list, list[list]]:
        """Folded full layers, and per task per later layer its (weight, bias, kept channels)."""
        key = (self._versions(), memory_format)
        if self._plan is not None and self._plan[0] == key:
            return self._plan[1]
        folded = [self._fold(conv, routed[0]) for conv, routed, _ in self.layers]
        masks = [routed[1].masks > 0 for _, routed, _ in self.layers]
        tasks = []
        for t in range(masks[0].shape[0]):
            kept = [m[t].nonzero().flatten() for m in masks]
            per_layer = []
            for i in range(1, len(self.layers)):
                w, b = folded[i]
                w = w.index_select(0, kept[i])
                # the first layer's output is shared and full: zero the inputs task t drops
                w = w * masks[0][t].view(1, -1, 1, 1).to(w.dtype) if i == 1 else w.index_select(1, kept[i - 1])
                per_layer.append((w.contiguous(memory_format=memory_format), b.index_select(0, kept[i])))
            tasks.append((per_layer, kept[-1]))
        first = (folded[0][0].contiguous(memory_format=memory_format), folded[0][1])
        self._plan = (key, (first, tasks))
        return first, tasks

    @staticmethod
    def _apply(conv: nn.Conv2d, after: list[nn.Module], x: torch.Tensor, w: torch.Tensor, b: torch.Tensor,
               groups: int = 1) -> torch.Tensor:
        x = F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, groups)
        for m in after:
            x = m(x)
        return x

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, head_w: torch.Tensor, head_b: torch.Tensor, mode: str = "loop",
                 group: int = 8) -> torch.Tensor:
        fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        (w0, b0), tasks = self.plan(fmt)
        conv0, _, after0 = self.layers[0]
        shared = self._apply(conv0, after0, x, w0, b0)
        if len(self.layers) == 1:
            pooled = shared.mean(dim=(2, 3))
            return torch.stack([(pooled.index_select(1, k) * head_w[t].index_select(0, k)).sum(-1)
                                for t, (_, k) in enumerate(tasks)], dim=1) + head_b
        run = self._grouped if mode == "grouped" else self._loop
        step = group if mode == "grouped" else len(tasks)
        logits = [run(shared, tasks[lo:lo + step], head_w[lo:lo + step]) for lo in range(0, len(tasks), step)]
        return torch.cat(logits, dim=1) + head_b

    def _loop(self, shared: torch.Tensor, tasks: list, head_w: torch.Tensor) -> torch.Tensor:
        out = []
        for (per_layer, kept), hw in zip(tasks, head_w, strict=True):
            h = shared
            for (conv, _, after), (w, b) in zip(self.layers[1:], per_layer, strict=True):
                h = self._apply(conv, after, h, w, b)
            out.append((h.mean(dim=(2, 3)) * hw.index_select(0, kept)).sum(-1))
        return torch.stack(out, dim=1)

    def _grouped(self, shared: torch.Tensor, tasks: list, head_w: torch.Tensor) -> torch.Tensor:
        g, h = len(tasks), shared
        for i, (conv, _, after) in enumerate(self.layers[1:]):
            size = max(per_layer[i][0].shape[0] for per_layer, _ in tasks)
            w = torch.cat([self._pad(per_layer[i][0], size, size_in=None if i == 0 else h.shape[1] // g)
                           for per_layer, _ in tasks])
            b = torch.cat([F.pad(per_layer[i][1], (0, size - len(per_layer[i][1]))) for per_layer, _ in tasks])
            w = w.contiguous(memory_format=torch.channels_last if h.is_contiguous(
                memory_format=torch.channels_last) else torch.contiguous_format)
            h = self._apply(conv, after, h, w, b, groups=1 if i == 0 else g)
        pooled = h.mean(dim=(2, 3)).view(len(h), g, -1)
        size = pooled.shape[-1]
        weights = torch.stack([F.pad(hw.index_select(0, kept), (0, size - len(kept)))
                               for (_, kept), hw in zip(tasks, head_w, strict=True)])
        return (pooled * weights).sum(-1)

    @staticmethod
    def _pad(w: torch.Tensor, size: int, size_in: int | None) -> torch.Tensor:
        """Zero-pad a task's weight to ``size`` outputs (and ``size_in`` inputs)."""
        pad_in = 0 if size_in is None else size_in - w.shape[1]
        return F.pad(w, (0, 0, 0, 0, 0, pad_in, 0, size - w.shape[0]))
