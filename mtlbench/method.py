"""The one interface every method implements.

A method is an ``nn.Module`` that owns everything method-specific:

- its **options** (``options_class``, a dataclass; :meth:`Method.resolve_options` checks them
  and fills in defaults, and the resolved dict is stored in the run's configuration);
- its **schedule**: which tasks each training step supervises (:data:`SCHEDULES`);
- its **forward** (per-task logits) and **all-task prediction**;
- its **training step** (:meth:`Method.train_step`: loss, backward, optimiser step; the
  default applies the run's task weighting);
- how its **FLOPs** are counted, its **parameter accounting** and what its result records.

The engine, the harness, ``bench`` and the results know none of these by name.

All tasks are binary; the built-in methods score them with :class:`TaskHeads`, one linear
head per task.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn

from mtlbench.backbones import BackboneSpec
from mtlbench.config import make_config
from mtlbench.errors import MtlbenchError
from mtlbench.layers import frozen_buffers


@dataclass(frozen=True)
class Budget:
    """The equal training budget, in supervised batches per task.

    ``per_epoch``: batches in one pass over the training images. ``epochs`` is set when the
    budget was given in epochs (then ``batches_per_task = round(epochs * per_epoch)``).
    """

    batches_per_task: int
    per_epoch: int
    epochs: float | None = None

    @property
    def total_epochs(self) -> float:
        """The budget in passes over the training images (exact when given in epochs)."""
        return self.epochs if self.epochs is not None else self.batches_per_task / self.per_epoch


# A schedule yields (tasks supervised by the step, index of the batch in the seeded stream).
def _all(num_tasks: int, budget: Budget, generator: torch.Generator) -> Iterator[tuple[list[int], int]]:
    """Every step supervises every task on batch k: each task sees batch k at step k."""
    everything = list(range(num_tasks))
    for k in range(budget.batches_per_task):
        yield everything, k


def _sample(num_tasks: int, budget: Budget, generator: torch.Generator,
            stream: str = "staggered") -> Iterator[tuple[list[int], int]]:
    """Each step trains one random task, drawn without replacement from ``batches_per_task``
    copies of every task: uniform at random each step, and every task gets exactly its
    budget (i.i.d. draws give it only in expectation).

    Which batch a task's k-th step uses (``stream``; every task sees the same N =
    ``batches_per_task`` batches of the seeded stream either way, so every image the same
    number of times):

    - ``staggered`` (default): batch ``(k + o_t) mod N``, task t starting at its own offset
      ``o_t = t * N // T``. Steps close in time use batches from all over the stream.
    - ``aligned``: batch k (mtlbench before 2026-12). Every task ends on the stream's last
      batches, so the last few dozen steps reuse a handful of batches, and a norm whose
      running statistics all tasks share ends up fitted to about one batch (measured: 1.5-2
      points of balanced accuracy lost by the final checkpoint of ``tr`` at sigma=1, T=40).
    """
    n = budget.batches_per_task
    offsets = [t * n // num_tasks if stream == "staggered" else 0 for t in range(num_tasks)]
    seen = [0] * num_tasks
    pool = torch.arange(num_tasks).repeat(n)
    for t in pool[torch.randperm(len(pool), generator=generator)].tolist():
        yield [t], (seen[t] + offsets[t]) % n
        seen[t] += 1


def _paper(num_tasks: int, budget: Budget, generator: torch.Generator) -> Iterator[tuple[list[int], int]]:
    """The official code's loop: a fresh batch each step and a task drawn i.i.d. each step.

    Budget: with ``--epochs E``, E passes over the data in all (E * per_epoch steps), so each
    task sees about E/T of a pass; with ``--steps-per-task N``, T * N steps, N batches per task
    in expectation."""
    steps = round(budget.epochs * budget.per_epoch) if budget.epochs is not None \
        else num_tasks * budget.batches_per_task
    draws = torch.randint(num_tasks, (steps,), generator=generator).tolist()
    for k, t in enumerate(draws):
        yield [t], k


def _round_robin(num_tasks: int, budget: Budget, generator: torch.Generator) -> Iterator[tuple[list[int], int]]:
    """One task per step in turn (T networks of their own): every task at the same point of
    its budget at any moment."""
    for k in range(budget.batches_per_task):
        for t in range(num_tasks):
            yield [t], k


# How a one-task-per-step schedule hands batches to tasks (``-o method.stream``; see _sample).
STREAMS = ("staggered", "aligned")


@dataclass(frozen=True)
class Schedule:
    run: Callable[..., Iterator[tuple[list[int], int]]]
    many_tasks_per_step: bool
    streams: bool = False  # takes ``stream=`` (STREAMS); the option is recorded only then

    def steps(self, num_tasks: int, budget: Budget) -> int:
        if self.run is _all:
            return budget.batches_per_task
        if self.run is _paper and budget.epochs is not None:
            return round(budget.epochs * budget.per_epoch)
        return num_tasks * budget.batches_per_task


SCHEDULES = {
    "all": Schedule(_all, True),
    "sample": Schedule(_sample, False, streams=True),
    "paper": Schedule(_paper, False),
    "round-robin": Schedule(_round_robin, False),
}


@dataclass
class MethodOptions:
    """Options every method has. ``schedule`` "" means the method's default; ``stream``
    (:data:`STREAMS`) is kept only where the schedule hands batches from one stream to one
    task per step (``sample``)."""

    schedule: str = ""
    stream: str = "staggered"


@dataclass
class WeightedOptions(MethodOptions):
    """Options of a method whose schedule may supervise several tasks per step: the task
    weighting (``--weighting``) and its own options (``-o weighting.KEY=VALUE``)."""

    weighting: str = "ew"
    weighting_options: dict = field(default_factory=dict)


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
    """Base class. Subclasses set ``options_class`` and ``schedules`` and implement
    :meth:`forward` and :meth:`param_counts`; everything else has a default."""

    options_class: type = MethodOptions
    schedules: tuple[str, ...] = ("all",)  # the first is the default
    # Options that choose between implementations tested to give the same numbers: they are
    # part of a run's key (its timings differ) but not of its setting (see mtlbench.config).
    implementation_options: tuple[str, ...] = ()
    # Options shown in a run's label (``label``), e.g. ("sigma",).
    label_options: tuple[str, ...] = ()
    # Another method and options this one equals (separate = tr at sigma 0): reports mark it
    # on that method's option axis.
    same_as: tuple[str, dict] | None = None
    name = ""  # set by the registry

    def __init__(self, backbone: BackboneSpec, num_tasks: int, options: MethodOptions, seed: int = 0) -> None:
        super().__init__()
        self.num_tasks = num_tasks
        self.options = options

    # ----- options -------------------------------------------------------------------------
    @classmethod
    def resolve_options(cls, given: dict) -> dict:
        """``given`` checked and completed with defaults, as the JSON dict a result records.

        The schedule defaults to the method's first; a weighting is kept only where the
        schedule supervises several tasks per step (``ew``, the plain sum, is then recorded),
        and ``stream`` only where the schedule takes one (``sample``).
        """
        what = f"method {cls.name!r}"
        opts = make_config(cls.options_class, given, what)
        opts.schedule = opts.schedule or cls.schedules[0]
        if opts.schedule not in cls.schedules:
            raise MtlbenchError(f"{what} supports schedule(s) {', '.join(cls.schedules)}, not {opts.schedule!r}")
        if isinstance(opts, WeightedOptions):
            from mtlbench.registry import WEIGHTINGS
            if not SCHEDULES[opts.schedule].many_tasks_per_step:
                if opts.weighting != "ew" or opts.weighting_options:
                    raise MtlbenchError(
                        f"--weighting {opts.weighting} needs a schedule that supervises several tasks per "
                        f"step; {cls.name} runs {opts.schedule!r} (one task per step): add --schedule all")
            else:
                weighting = WEIGHTINGS.get(opts.weighting)
                opts.weighting_options = weighting.resolve_options(opts.weighting_options)
        if opts.stream not in STREAMS:
            raise MtlbenchError(f"method option stream must be one of {', '.join(STREAMS)}, got {opts.stream!r}")
        cls.check_options(opts)
        resolved = dataclasses.asdict(opts)
        if not SCHEDULES[opts.schedule].streams:
            del resolved["stream"]
        if isinstance(opts, WeightedOptions) and not SCHEDULES[opts.schedule].many_tasks_per_step:
            del resolved["weighting"], resolved["weighting_options"]
        return resolved

    @classmethod
    def check_options(cls, options: MethodOptions) -> None:
        """Raise :class:`MtlbenchError` for a bad combination of options (values are typed)."""

    @classmethod
    def options_from(cls, resolved: dict) -> MethodOptions:
        return make_config(cls.options_class, resolved, f"method {cls.name!r}")

    @classmethod
    def label(cls, options: dict) -> str:
        """A short name for a run of this method with ``options`` (tables and figures)."""
        parts = [f"{k}={options[k]:g}" if isinstance(options.get(k), float) else f"{k}={options.get(k)}"
                 for k in cls.label_options if k in options]
        weighting = options.get("weighting", "ew")
        if options.get("stream", STREAMS[0]) != STREAMS[0]:
            parts.append(f"stream={options['stream']}")
        return " ".join([cls.name + (f"+{weighting}" if weighting != "ew" else ""), *parts])

    # ----- training --------------------------------------------------------------------------
    def schedule(self, budget: Budget, generator: torch.Generator) -> Iterator[tuple[list[int], int]]:
        """(tasks, batch index) per training step."""
        schedule = SCHEDULES[self.options.schedule]
        if schedule.streams:
            return schedule.run(self.num_tasks, budget, generator, stream=self.options.stream)
        return schedule.run(self.num_tasks, budget, generator)

    @classmethod
    def total_steps(cls, num_tasks: int, budget: Budget, schedule: str) -> int:
        """Optimiser steps the schedule takes (for progress, learning-rate schedules, evaluation)."""
        return SCHEDULES[schedule].steps(num_tasks, budget)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, tasks: list[int], trainer) -> torch.Tensor:
        """One optimiser step on images ``x`` and labels ``y [B, T]`` for ``tasks``; returns the
        per-task losses (detached). ``trainer`` (:class:`mtlbench.engine.Trainer`) holds the
        optimiser, precision, loss and the task weighting.
        """
        weighting = trainer.weighting
        trainer.zero_grad()
        rep = None
        with trainer.autocast():
            if weighting.uses_representation:
                z, head = self.representation(x, tasks)
                rep = (z, z.detach().requires_grad_())
                # The heads read a view of the leaf, not the leaf itself: hooks on module inputs
                # (FlopCounterMode's module tracker) cannot run during autograd.grad on a leaf.
                logits = head(rep[1].view_as(rep[1]))
            else:
                logits = self(x, tasks)
        losses = trainer.losses(logits, y, tasks)
        weighting.backward(losses, self, trainer, rep)
        trainer.step()
        weighting.post_step()
        if weighting.needs_losses_after_step:  # FAMO: the same batch, after the update
            with torch.no_grad(), frozen_buffers(self), trainer.autocast():
                weighting.after_step(trainer.losses(self(x, tasks), y, tasks).detach())
        return losses.detach()

    def make_weighting(self):
        """The task weighting this method's training step applies (``ew`` unless its options
        name another; one-task-per-step schedules always sum their single loss)."""
        from mtlbench.registry import WEIGHTINGS
        cls = WEIGHTINGS.get(getattr(self.options, "weighting", "ew"))
        options = make_config(cls.options_class, getattr(self.options, "weighting_options", {}), f"weighting {cls.name!r}")
        return cls(self.num_tasks, options)

    def shared_parameters(self) -> list[nn.Parameter]:
        """Parameters more than one task's loss reaches (gradient weightings act on these)."""
        specific = {id(p) for p in self.task_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in specific]

    def task_parameters(self) -> list[nn.Parameter]:
        """Parameters only one task's loss reaches (its head)."""
        heads = getattr(self, "heads", None)
        return [p for p in heads.parameters() if p.requires_grad] if heads is not None else []

    def representation(self, x: torch.Tensor, tasks: list[int]) -> tuple[torch.Tensor, Callable]:
        """Features shared by every task and a function from them to the tasks' logits, for
        gradient weightings on the representation (``-o weighting.grads=rep``)."""
        raise MtlbenchError(f"method {self.name!r} has no representation shared by all tasks; "
                            "use -o weighting.grads=all")

    # ----- model ------------------------------------------------------------------------------
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

    def backbone_details(self) -> dict:
        """What the backbone records about itself (a timm model's stages and input rule)."""
        from mtlbench.backbones import Backbone
        return next((m.details for m in self.modules() if isinstance(m, Backbone)), {})

    def flop_device(self) -> str:
        """Where :func:`mtlbench.engine.method_flops` may count this model's FLOPs: ``meta`` (no
        compute) unless the method needs real values (gathered indices, say)."""
        return "meta"

    # ----- measurement -------------------------------------------------------------------------
    @classmethod
    def bench_figures(cls, bench) -> dict:
        """Speed figures of this method's own implementations for ``mtlbench bench``
        (:class:`mtlbench.bench.Bench` provides models, training steps and timing in turns)."""
        return {}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
