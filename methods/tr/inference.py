"""All-task inference for task routing: every task's logits for a batch in eval mode.

See :class:`AllTaskInference`. Its modes are chosen by ``-o method.inference``; the figures
behind ``auto`` are printed by ``mtlbench bench`` (``tr_all_task_inference_by_mode``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtlbench.layers import conv_outputs, group_size
from mtlbench.methods.tr.compact import CompactRouting
from mtlbench.methods.tr.routing import Routed

CACHE_BYTES = 256 << 20  # per-task gathered weights kept between calls, at most this much


class AllTaskInference:
    """Every task's logits for a batch in eval mode, at the cost of the compact sub-networks.

    Eval-mode batch norm is an affine map per channel, so it is folded into the conv before
    it (``w * gamma / sqrt(var + eps)``, bias ``beta - mean * gamma / sqrt(var + eps)``), with
    the task's own row of statistics where the norm keeps one per task.
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
                   for t in (conv.weight, conv.bias, *routed[0].parameters(), *routed.buffers())]
        return tuple((id(t), t.data_ptr(), t._version) for t in tensors if t is not None)

    @staticmethod
    def _fold(conv: nn.Conv2d, routed: Routed, task: int, rows: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and eval-mode norm of ``task`` as one conv (output channels ``rows``, or all)."""
        bn = routed[0]
        mean, var, _ = routed.statistics(task)
        pick = (lambda v: v) if rows is None else (lambda v: v.index_select(0, rows))  # noqa: E731
        scale = torch.rsqrt(pick(var) + bn.eps)
        if bn.weight is not None:
            scale = scale * pick(bn.weight)
        shift = -pick(mean) * scale
        if bn.bias is not None:
            shift = shift + pick(bn.bias)
        if conv.bias is not None:
            shift = shift + pick(conv.bias) * scale
        return pick(conv.weight) * scale.view(-1, 1, 1, 1), shift

    def plan(self) -> tuple[list, list, list]:
        """The folded first layer, each layer's masks, and per task its kept channels per layer.

        Cached until a parameter or running statistic changes. Per-task weights gathered from
        these are kept too, up to ``CACHE_BYTES`` (beyond that they are gathered at each call,
        so memory stays bounded however many tasks there are).
        """
        key = self._versions()
        if self._plan is None or self._plan[0] != key:
            first = self._fold(self.layers[0][0], self.layers[0][1], 0)  # shared by every task
            masks = [routed[1].masks > 0 for _, routed, _ in self.layers]
            kept = [[m[t].nonzero().flatten() for m in masks] for t in range(masks[0].shape[0])]
            per_task = any(routed.per_task for _, routed, _ in self.layers)
            self._plan = (key, (first, masks, kept), {"bytes": 0}, self._sharing(masks, kept, per_task))
        return self._plan[1]

    @staticmethod
    def _sharing(masks: list[torch.Tensor], kept: list, per_task: bool
                 ) -> tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tasks with the same masks in every layer run one sub-network (at sigma=1, all do),
        unless some norm keeps statistics per task (then every task has its own).

        Returns the representative tasks, each task's representative (as a position in that
        list), and per task its last layer's kept channels padded to the widest (with validity).
        """
        reps, owner, seen = [], [], {}
        signature = torch.cat(masks, dim=1).cpu().numpy()
        for t in range(len(kept)):
            key = (t if per_task else -1, signature[t].tobytes())
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
        _, masks, kept = self._plan[1]
        conv, routed, _ = self.layers[i]
        w, b = self._fold(conv, routed, t, kept[t][i])
        # the first layer's output is shared and full: zero the inputs task t drops
        w = w * masks[0][t].view(1, -1, 1, 1).to(w.dtype) if i == 1 else w.index_select(1, kept[t][i - 1])
        return w.contiguous(memory_format=fmt), b

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
        first, _, kept = self.plan()
        reps, owner, index, valid = self._plan[3]
        conv0, _, after0 = self.layers[0]
        shared = self._apply(conv0, after0, x, first[0].contiguous(memory_format=fmt), first[1])
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
