"""The one interface every method implements; the engine knows nothing method-specific.

A method is an ``nn.Module`` that declares four things:

1. ``__init__(backbone, num_tasks, config, seed)``: build its model from a backbone spec;
2. ``schedule(steps_per_task, generator)``: which tasks each training step supervises;
3. ``forward(x, tasks)``: per-task logits ``[batch, len(tasks)]`` for a batch and task ids;
4. ``param_counts()``: trainable total, shared, task-specific (and routing's active units).

All tasks are binary; every method scores them with :class:`TaskHeads`, one linear head
per task.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mtlbench.backbones import BackboneSpec


@dataclass
class MethodConfig:
    """Options shared by every method; a method may subclass this with more."""

    sigma: float = 1.0
    schedule: str = "all"


class TaskHeads(nn.Module):
    """T linear heads ``feature -> 1 logit`` stored as one ``[T, F]`` weight (scales to 1000s)."""

    def __init__(self, num_features: int, num_tasks: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(num_features)  # nn.Linear's default initialisation
        self.weight = nn.Parameter(torch.empty(num_tasks, num_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_tasks).uniform_(-bound, bound))

    # Products are summed over the feature axis in the same order whether one head or all
    # heads are evaluated, so a routed pass at sigma=1 reproduces hard sharing bit for bit
    # (a matmul's blocking would differ with the number of heads).
    def forward(self, features: torch.Tensor, tasks: list[int] | torch.Tensor) -> torch.Tensor:
        """``features [B, F]`` (shared by all ``tasks``) -> logits ``[B, len(tasks)]``."""
        idx = torch.as_tensor(tasks, device=self.weight.device)
        return (features[:, None, :] * self.weight[idx]).sum(dim=-1) + self.bias[idx]

    def one(self, features: torch.Tensor, task: int) -> torch.Tensor:
        """Logits ``[B]`` of a single task."""
        return (features * self.weight[task]).sum(dim=-1) + self.bias[task]


class Method(nn.Module):
    """Base class. Subclasses set ``config_class`` and ``schedules`` and implement forward."""

    config_class = MethodConfig
    schedules: tuple[str, ...] = ("all",)  # the first is the default
    uses_sigma = False                    # whether --sigma changes this method
    fixed_sigma: float | None = None      # the sharing ratio it sits at, if it has one

    def __init__(self, backbone: BackboneSpec, num_tasks: int, config: MethodConfig, seed: int = 0) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.config = config

    def schedule(self, steps_per_task: int, generator: torch.Generator) -> Iterator[list[int]]:
        """Default ``all``: ``steps_per_task`` steps, each supervising every task."""
        everything = list(range(self.num_tasks))
        for _ in range(steps_per_task):
            yield everything

    @classmethod
    def total_steps(cls, num_tasks: int, steps_per_task: int, schedule: str) -> int:
        """Optimiser steps the schedule takes (for progress bars and budgets)."""
        return steps_per_task

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        raise NotImplementedError

    def predict_all(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of every task ``[B, T]``, each method in its own cheapest way."""
        return self(x, list(range(self.num_tasks)))

    def param_counts(self) -> dict:
        raise NotImplementedError

    def prepare(self, device: torch.device) -> None:
        """Called once the model is on its device: choose device-dependent implementations."""

    def describe(self) -> dict:
        """Method-specific facts worth recording in a result (insertion points, etc.)."""
        return {}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def sample_schedule(num_tasks: int, steps_per_task: int, generator: torch.Generator) -> Iterator[list[int]]:
    """The Task Routing paper's schedule: each step trains one randomly drawn task.

    Drawn without replacement from ``steps_per_task`` copies of every task, so each step's
    task is uniform at random and every task still gets exactly ``steps_per_task`` batches
    (the equal budget), where i.i.d. draws would only give it in expectation.
    """
    pool = torch.arange(num_tasks).repeat(steps_per_task)
    for t in pool[torch.randperm(len(pool), generator=generator)].tolist():
        yield [t]
