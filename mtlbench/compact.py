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
# Activation budget of one grouped call (tr's all-task inference, stl's grouped columns): it
# sets how many tasks or columns one call holds, so memory stays bounded as T grows.
# Measured with tests/benchmarks/auto_rules.py (sigma 0.5, T=40, batch 250): on a 2-core CPU
# larger budgets gain nothing for tr and make stl 2-3x slower (out of cache); on an H200,
# 1 GiB is as fast as 4 GiB and 1.4x (tr) to 1.8x (stl) faster than 64 MiB.
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
        # where the per-task part starts when several tasks share the first layer
        self._second_conv = next((i for i, m in enumerate(leaves) if i and isinstance(m, nn.Conv2d)), None)

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
        # Padding pays for itself in the batch-norm backward; inference needs none.
        active = self.active(task, x.device, PAD if torch.is_grad_enabled() else 1)
        return self._run(x, active, start=0)

    def _run(self, x: torch.Tensor, active: list, start: int, layer: int = 0,
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
                x = self._norm(m[0], x, out, keep)
                idx_in, layer = out, layer + 1
            else:
                x = m(x)
        return x.mean(dim=(2, 3)), idx_in

    def forward_many(self, x: torch.Tensor, tasks: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`forward` for several tasks on one batch, sharing the first layer.

        Every task sees the same images, so the first conv, its batch norm (batch statistics
        are per channel, whichever task computes them) and what follows up to the second conv
        are the same for all tasks on the channels they keep: computed once at full width,
        then each task takes its channels. The running statistics get each task's update in
        turn, on the units that task keeps, exactly as one pass per task would.
        """
        second, conv, routed = self._second_conv, self.leaves[0], self.leaves[1]
        if second is None or conv.bias is not None:
            return [self.forward(x, t) for t in tasks]
        pad = PAD if torch.is_grad_enabled() else 1
        h = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation)
        h = self._shared_norm(routed, h, tasks)
        for m in self.leaves[2:second]:
            h = m(h)
        # Each task's second conv reads the full first layer with zero weights on the channels
        # the task drops (cheaper here than gathering activations, whose backward scatters).
        masks = routed[1].masks > 0
        return [self._run(h, self.active(t, x.device, pad), start=second, layer=1, keep_in=masks[t]) for t in tasks]

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


CACHE_BYTES = 256 << 20  # per-task gathered weights kept between calls, at most this much


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
        """Per image and task, the elements of the largest conv output after the first layer
        (the first is computed once for all tasks)."""
        sizes = conv_outputs(self.compact.leaves, x.shape[2], x.shape[3])
        return max(sizes[1:], default=0)

    def supported(self) -> bool:
        """Folding needs running statistics (a norm without them uses batch statistics)."""
        return all(r[0].running_mean is not None for _, r, _ in self.layers)

    def _versions(self) -> tuple:
        """Changes whenever a weight, statistic or mask is written or moved (``.to``, loading)."""
        tensors = [t for conv, routed, _ in self.layers
                   for t in (conv.weight, conv.bias, *routed[0].parameters(), routed[0].running_mean,
                             routed[0].running_var, routed[1].masks)]
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)

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

    def plan(self) -> tuple[list, list, list]:
        """Folded layers (full size), each layer's masks, and per task its kept channels per layer.

        Cached until a parameter or running statistic changes. Per-task weights gathered from
        these are kept too, up to ``CACHE_BYTES`` (then gathered at each call: ~7% slower at
        batch 64, so memory stays bounded however many tasks there are).
        """
        key = self._versions()
        if self._plan is None or self._plan[0] != key:
            folded = [self._fold(conv, routed[0]) for conv, routed, _ in self.layers]
            masks = [routed[1].masks > 0 for _, routed, _ in self.layers]
            kept = [[m[t].nonzero().flatten() for m in masks] for t in range(masks[0].shape[0])]
            self._plan = (key, (folded, masks, kept), {"bytes": 0}, self._sharing(masks, kept))
        return self._plan[1]

    @staticmethod
    def _sharing(masks: list[torch.Tensor], kept: list) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tasks with the same masks in every layer run one sub-network (at sigma=1, all do).

        Returns the representative tasks, each task's representative (as a position in that
        list), and per task its last layer's kept channels padded to the widest (with validity).
        """
        reps, owner, seen = [], [], {}
        signature = torch.cat(masks, dim=1).cpu().numpy()
        for t in range(len(kept)):
            key = signature[t].tobytes()
            if key not in seen:
                seen[key] = len(reps)
                reps.append(t)
            owner.append(seen[key])
        width = max(len(k[-1]) for k in kept)
        device = masks[0].device
        index = torch.zeros(len(kept), width, dtype=torch.long, device=device)
        valid = torch.zeros(len(kept), width, dtype=torch.bool, device=device)
        for t, k in enumerate(kept):
            index[t, :len(k[-1])], valid[t, :len(k[-1])] = k[-1], True
        return reps, torch.tensor(owner, device=device), index, valid

    def _task_weight(self, i: int, t: int, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        """Task ``t``'s folded weight and bias of layer ``i >= 1`` (kept while within budget)."""
        return self._cached((i, t, fmt), lambda: self._gather(i, t, fmt))

    def _cached(self, key: tuple, make) -> tuple[torch.Tensor, ...]:
        cache = self._plan[2]
        if key not in cache:
            value = make()
            size = sum(v.nbytes for v in value)
            if cache["bytes"] + size > CACHE_BYTES:
                return value
            cache["bytes"] += size
            cache[key] = value
        return cache[key]

    def _gather(self, i: int, t: int, fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        folded, masks, kept = self._plan[1]
        w, b = folded[i]
        w = w.index_select(0, kept[t][i])
        # the first layer's output is shared and full: zero the inputs task t drops
        w = w * masks[0][t].view(1, -1, 1, 1).to(w.dtype) if i == 1 else w.index_select(1, kept[t][i - 1])
        return w.contiguous(memory_format=fmt), b.index_select(0, kept[t][i])

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
        folded, _, kept = self.plan()
        reps, owner, index, valid = self._plan[3]
        conv0, _, after0 = self.layers[0]
        shared = self._apply(conv0, after0, x, folded[0][0].contiguous(memory_format=fmt), folded[0][1])
        width = index.shape[1]
        if len(self.layers) == 1:
            features = torch.stack([F.pad(shared.mean(dim=(2, 3)).index_select(1, kept[t][-1]),
                                          (0, width - len(kept[t][-1]))) for t in reps], dim=1)
        else:
            run = self._grouped if mode == "grouped" else self._loop
            step = group if mode == "grouped" else len(reps)
            features = torch.cat([run(shared, reps[lo:lo + step], fmt, width)
                                  for lo in range(0, len(reps), step)], dim=1)  # [B, reps, width]
        weights = head_w.gather(1, index) * valid  # each task's head on its kept channels
        chunk = group_size(features.shape[0] * width * features.element_size(), len(owner), x.device)
        logits = [(features.index_select(1, owner[lo:lo + chunk]) * weights[lo:lo + chunk]).sum(-1)
                  for lo in range(0, len(owner), chunk)]
        return torch.cat(logits, dim=1) + head_b

    def _loop(self, shared: torch.Tensor, tasks: list[int], fmt: torch.memory_format, width: int) -> torch.Tensor:
        """Pooled last-layer features of each task's sub-network, padded to ``width``."""
        out = []
        for t in tasks:
            h = shared
            for i, (conv, _, after) in enumerate(self.layers[1:], start=1):
                h = self._apply(conv, after, h, *self._task_weight(i, t, fmt))
            pooled = h.mean(dim=(2, 3))
            out.append(F.pad(pooled, (0, width - pooled.shape[1])))
        return torch.stack(out, dim=1)

    def _grouped(self, shared: torch.Tensor, tasks: list[int], fmt: torch.memory_format, width: int) -> torch.Tensor:
        """The same, ``len(tasks)`` sub-networks per convolution call."""
        g, h = len(tasks), shared
        for i, (conv, _, after) in enumerate(self.layers[1:], start=1):
            size_in = None if i == 1 else h.shape[1] // g
            w, b = self._cached(("group", tuple(tasks), i, fmt), lambda: self._stacked(i, tasks, size_in, fmt))
            h = self._apply(conv, after, h, w, b, groups=1 if i == 1 else g)
        pooled = h.mean(dim=(2, 3)).view(len(h), g, -1)
        return F.pad(pooled, (0, width - pooled.shape[-1]))

    def _stacked(self, i: int, tasks: list[int], size_in: int | None,
                 fmt: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s weights of ``tasks`` for one grouped call, each padded to the largest."""
        kept = self._plan[1][2]
        size = max(len(kept[t][i]) for t in tasks)
        ws, bs = zip(*(self._gather(i, t, fmt) for t in tasks), strict=True)
        w = torch.cat([self._pad(w, size, size_in) for w in ws]).contiguous(memory_format=fmt)
        return w, torch.cat([F.pad(b, (0, size - len(b))) for b in bs])

    @staticmethod
    def _pad(w: torch.Tensor, size: int, size_in: int | None) -> torch.Tensor:
        """Zero-pad a task's weight to ``size`` outputs (and ``size_in`` inputs)."""
        pad_in = 0 if size_in is None else size_in - w.shape[1]
        return F.pad(w, (0, 0, 0, 0, 0, pad_in, 0, size - w.shape[0]))
