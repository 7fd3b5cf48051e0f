"""The in-memory form every dataset plugin provides, and the batching the engine uses.

Images stay as uint8 tensors (on the target device once training starts); a batch is a
slice plus one normalisation, with no per-image Python work.
"""
from __future__ import annotations

import copy

import torch
from torch.utils.data import Dataset

from mtlbench.errors import MtlbenchError


class TaskDataset(Dataset):
    """Base class for dataset plugins: ``images`` uint8 ``[N, C, H, W]``, ``labels`` ``[N, T]``.

    Subclasses fill ``images``, ``labels`` (0/1, uint8) and ``task_names`` and set ``mean`` /
    ``std`` (per channel, on the 0..1 scale) and ``max_tasks``.
    """

    images: torch.Tensor
    labels: torch.Tensor
    task_names: list[str]
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.25, 0.25, 0.25)
    splits: tuple[str, ...] = ("train", "test")
    # The budget that reaches convergence on this dataset ({"epochs": E} or
    # {"steps_per_task": N}), used when a run gives none; recorded in every result.
    default_budget: dict = {"epochs": 10}
    # BCE positive weighting by default: "auto" (negatives over positives) or "none".
    default_pos_weight: str = "none"
    # Ground truth a dataset may know about its tasks (generated ones do): one dict per task,
    # and named groupings (``{"cluster": ["cluster 0", ...]}``) that reports break scores down by.
    task_info: list[dict] = []
    task_groups: dict[str, list[str]] = {}

    @classmethod
    def canonical_options(cls, options: dict) -> dict:
        """The resolved options as a run records them (its key hashes them). A dataset that
        gains options can drop them here when they are at values that change nothing, so
        that earlier runs keep their keys."""
        return options

    @classmethod
    def budget_for(cls, config: object) -> dict:
        """The default budget under dataset options ``config`` (a dataset whose options change
        how much training it needs, such as a regime, overrides this)."""
        return dict(cls.default_budget)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]

    @property
    def num_tasks(self) -> int:
        return self.labels.shape[1]

    def subset(self, indices: torch.Tensor) -> "TaskDataset":
        """A view of some images (same tasks), e.g. for a held-out evaluation split."""
        part = copy.copy(self)
        part.images, part.labels = self.images[indices], self.labels[indices]
        return part

    def positive_rate(self) -> list[float]:
        return self.labels.float().mean(dim=0).tolist()


def stratified_carve(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(rest, carved)`` with about ``fraction`` of the images carved, stratified by task.

    Multi-label stratification, greedily: tasks are taken from the rarest positives up; each
    takes ``round(fraction * n)`` of its positives not yet assigned (at least one, when it has
    two or more) into the carved part and leaves the others. Images positive for no task are
    carved at the same rate. For one-vs-rest tasks this is exact class stratification; every
    task with two or more positives gets at least one in each part.
    """
    g = torch.Generator().manual_seed(seed)
    n, t = labels.shape
    y = labels.bool()
    assigned = torch.zeros(n, dtype=torch.bool)
    carved = torch.zeros(n, dtype=torch.bool)
    for task in torch.argsort(y.sum(dim=0), stable=True).tolist():
        pos = y[:, task]
        free = (pos & ~assigned).nonzero().flatten()
        free = free[torch.randperm(len(free), generator=g)]
        total, already = int(pos.sum()), int((pos & carved).sum())
        kept = int((pos & assigned & ~carved).sum())
        take = max(round(fraction * total), 1 if total >= 2 else 0) - already
        take = min(max(take, 0), len(free) - (1 if kept == 0 and total >= 2 else 0))
        carved[free[:max(take, 0)]] = True
        assigned[free] = True
    rest = (~assigned).nonzero().flatten()
    rest = rest[torch.randperm(len(rest), generator=g)]
    carved[rest[:round(fraction * len(rest))]] = True
    return (~carved).nonzero().flatten(), carved.nonzero().flatten()


def positive_weights(labels: torch.Tensor) -> torch.Tensor:
    """Per task, negatives over positives of ``labels [N, T]`` (the BCE ``pos_weight`` that makes
    both classes weigh the same); 1 for a task without positives or negatives."""
    pos = labels.float().sum(dim=0)
    neg = len(labels) - pos
    return torch.where((pos > 0) & (neg > 0), neg / pos.clamp(min=1), torch.ones_like(pos))


def check_split(split: str, valid: tuple[str, ...], dataset: str) -> None:
    if split not in valid:
        raise MtlbenchError(f"{dataset}: unknown split {split!r}; valid splits: {', '.join(valid)}")


def check_num_tasks(num_tasks: int, maximum: int, dataset: str) -> None:
    if not 1 <= num_tasks <= maximum:
        raise MtlbenchError(f"{dataset} offers 1 to {maximum} tasks; --tasks {num_tasks} is out of range")


class Batches:
    """Deterministic batches: the k-th batch is the same for every method given the seed.

    Each epoch is a seeded permutation of the training set. ``get(k)`` returns batch ``k``,
    so the engine can hand every task the same sequence of batches under every method.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int,
                 mean: tuple, std: tuple) -> None:
        if batch_size > len(images):
            raise MtlbenchError(f"--batch-size {batch_size} is larger than the training set ({len(images)} images)")
        self.images, self.labels, self.batch_size, self.seed = images, labels, batch_size, seed
        self.per_epoch = len(images) // batch_size
        self._perms: dict[int, torch.Tensor] = {}
        shape = (1, -1, 1, 1)
        self.mean = torch.tensor(mean, device=images.device).view(shape)
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=images.device))).view(shape)

    def get(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, pos = divmod(k, self.per_epoch)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms[epoch] = torch.randperm(len(self.images), generator=g).to(self.images.device)
        idx = self._perms[epoch][pos * self.batch_size:(pos + 1) * self.batch_size]
        return self.normalise(self.images[idx]), self.labels[idx]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() - 255.0 * self.mean) * self.scale
        # channels_last: the faster layout for the CPU convolution kernels (mtlbench bench runs in it).
        return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
