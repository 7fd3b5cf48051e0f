"""Task weightings: how a training step that supervises several tasks combines them.

A second axis beside the methods (``--weighting``). Two families:

- **Loss weightings** (:class:`LossWeighting`) scale each task's loss: ``Σ w_t L_t`` is
  backpropagated once (``ew``, ``uw``, ``dwa``, ``rlw``, ``famo``).
- **Gradient weightings** (:class:`GradientWeighting`) look at each task's gradient on the
  shared parameters and choose the update ``d = Σ c_t g_t``. Every one of them here (MGDA,
  PCGrad, CAGrad, IMTL-G, Nash-MTL, Aligned-MTL) needs the gradients only through their
  inner products, so it is written as ``coefficients(gram, losses) -> c`` on the Gram matrix
  ``G Gᵀ``; the update is then rebuilt from the gradients (or, when they are too many to
  keep, by one more backward pass of ``Σ c_t L_t``). Task-specific parameters (the heads)
  get the plain sum of their tasks' gradients, as in LibMTL.

Per-task gradients are taken on the method's shared parameters (``-o weighting.grads=all``,
the default) or on the representation every task reads (``grads=rep``: the papers' "-UB"
variants; only methods with such a representation, e.g. ``hard``). Memory is bounded: the
``T x P`` gradient matrix is kept only while it fits in ``-o weighting.memory_mb`` (default
1024); beyond that the Gram matrix is accumulated block by block (tasks in blocks that fit,
each pair of blocks recomputed), which costs more backward passes but never more memory.

Every weighting records the per-task weights (or coefficients) it used, summarised over
training, in the result.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from mtlbench.config import make_config
from mtlbench.errors import MtlbenchError


@dataclass
class WeightingOptions:
    """Options every weighting has (none); subclasses add their own."""


@dataclass
class GradientOptions(WeightingOptions):
    grads: str = "all"       # per-task gradients on all shared parameters, or on the representation (rep)
    memory_mb: int = 1024    # keep the T x P gradient matrix only up to this size


class Weighting(nn.Module):
    """Base class. A weighting may hold parameters (they join the run's optimiser)."""

    options_class: type = WeightingOptions
    paper = ""                       # shown by ``mtlbench list``
    needs_losses_after_step = False  # after_step gets the batch's losses after the update
    name = ""                        # set by the registry
    SNAPSHOTS = 20

    def __init__(self, num_tasks: int, options: WeightingOptions) -> None:
        super().__init__()
        self.num_tasks, self.options = num_tasks, options
        self.total_steps, self.steps_per_epoch = 1, 1
        self._count = 0
        self._sum = torch.zeros(num_tasks, dtype=torch.float64)
        self._sumsq = torch.zeros(num_tasks, dtype=torch.float64)
        self._min = torch.full((num_tasks,), float("inf"), dtype=torch.float64)
        self._max = torch.full((num_tasks,), float("-inf"), dtype=torch.float64)
        self._snapshots: list[tuple[int, list[float]]] = []

    @classmethod
    def resolve_options(cls, given: dict) -> dict:
        opts = make_config(cls.options_class, given, f"weighting {cls.name!r}")
        cls.check_options(opts)
        return dataclasses.asdict(opts)

    @classmethod
    def check_options(cls, options: WeightingOptions) -> None:
        if isinstance(options, GradientOptions):
            if options.grads not in ("all", "rep"):
                raise MtlbenchError(f"weighting {cls.name} option grads must be all or rep, got {options.grads!r}")
            if options.memory_mb < 1:
                raise MtlbenchError(f"weighting {cls.name} option memory_mb must be at least 1")

    @property
    def uses_representation(self) -> bool:
        return getattr(self.options, "grads", "all") == "rep"

    def backward(self, losses: torch.Tensor, method, trainer, rep: tuple | None) -> None:
        """Set the gradients of every trainable parameter for per-task ``losses [T]``."""
        raise NotImplementedError

    def after_step(self, losses: torch.Tensor) -> None:
        """The same batch's losses after the optimiser step (``needs_losses_after_step``)."""

    def post_step(self) -> None:
        """Called after every optimiser step (GradNorm renormalises its weights here)."""

    def configure(self, total_steps: int, steps_per_epoch: int) -> None:
        """The run's length, in optimiser steps, and the steps of one epoch of its schedule."""
        self.total_steps, self.steps_per_epoch = max(1, total_steps), max(1, steps_per_epoch)

    # ----- resuming a run ------------------------------------------------------------------
    _SETUP = frozenset(vars(nn.Module())) | {"num_tasks", "options", "total_steps", "steps_per_epoch"}

    def training_state(self) -> dict:
        """What training changed in this weighting, for a resumed run: its parameters and
        buffers, and every other attribute set after construction (tensors, numbers and
        containers of them; a ``torch.Generator`` by its state). A weighting with other kinds of
        state overrides this and :meth:`load_training_state`."""
        return {"module": self.state_dict(),
                "attrs": {k: _saveable(v) for k, v in vars(self).items() if k not in self._SETUP}}

    def load_training_state(self, state: dict) -> None:
        self.load_state_dict(state["module"])
        for name, value in state["attrs"].items():
            current = getattr(self, name, None)
            if isinstance(current, torch.Generator):
                current.set_state(value["generator_state"])
            else:
                setattr(self, name, value.to(current.device) if isinstance(current, torch.Tensor) else value)

    # ----- recording ---------------------------------------------------------------------
    def record(self, weights: torch.Tensor) -> None:
        """Keep running statistics and a few snapshots of the per-task weights of a step."""
        if weights.is_meta:  # counting FLOPs: no values
            return
        w = weights.detach().double().cpu()
        self._count += 1
        self._sum += w
        self._sumsq += w * w
        self._min = torch.minimum(self._min, w)
        self._max = torch.maximum(self._max, w)
        every = max(1, self.total_steps // self.SNAPSHOTS)
        if self._count == 1 or self._count % every == 0:
            self._snapshots.append((self._count, [round(v, 6) for v in w.tolist()]))

    def summary(self) -> dict:
        if not self._count:
            return {"name": self.name, "steps": 0}
        mean = self._sum / self._count
        std = (self._sumsq / self._count - mean * mean).clamp(min=0).sqrt()
        rounded = lambda t: [round(v, 6) for v in t.tolist()]  # noqa: E731
        return {"name": self.name, "options": dataclasses.asdict(self.options), "steps": self._count,
                "weights_mean": rounded(mean), "weights_std": rounded(std), "weights_min": rounded(self._min),
                "weights_max": rounded(self._max),
                "snapshots": [{"step": s, "weights": w} for s, w in self._snapshots]}


class LossWeighting(Weighting):
    """Backpropagates ``Σ w_t L_t`` once; subclasses give ``weights(losses)``."""

    def weights(self, losses: torch.Tensor) -> torch.Tensor:
        """Per-task weights ``[T]`` (may carry gradients to the weighting's own parameters)."""
        raise NotImplementedError

    def loss(self, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return (weights * losses).sum()

    def backward(self, losses: torch.Tensor, method, trainer, rep: tuple | None) -> None:
        w = self.weights(losses.detach())
        trainer.backward(self.loss(losses, w))
        self.record(w)


class GradientWeighting(Weighting):
    """Chooses ``d = Σ c_t g_t`` from the Gram matrix of the per-task gradients."""

    options_class = GradientOptions

    def coefficients(self, gram: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        """``c [T]`` from ``gram [T, T]`` (float64, ``gram[i, j] = g_i · g_j``) and the losses."""
        raise NotImplementedError

    def backward(self, losses: torch.Tensor, method, trainer, rep: tuple | None) -> None:
        scale = trainer.grad_scale()
        specific = method.task_parameters()
        if rep is not None:
            z, zd = rep
            grads = task_gradients(losses, [zd], scale, trainer)  # [T, B*F]
            c = self.coefficients(gram_of(grads), losses.detach())
            trainer.backward(losses.sum(), inputs=specific)
            z.backward((c.to(grads.dtype) @ grads).view_as(z) * scale)
            self.record(c)
            return
        shared = method.shared_parameters()
        size = sum(p.numel() for p in shared)
        budget = self.options.memory_mb * 2 ** 20 // 4  # float32 entries
        if len(losses) * size <= budget:
            grads = task_gradients(losses, shared, scale, trainer)
            c = self.coefficients(gram_of(grads), losses.detach())
            combined = (c.to(grads.dtype) @ grads) * scale
            trainer.backward(losses.sum(), inputs=specific)
            offset = 0
            for p in shared:
                # In p's own memory layout (channels_last convs): the fused optimisers read a
                # gradient's memory in the parameter's order, so a plain-layout copy scrambles it.
                p.grad = torch.empty_like(p).copy_(combined[offset:offset + p.numel()].view(p.shape))
                offset += p.numel()
        else:  # the Gram matrix block by block, then one more backward pass for the update
            gram = blocked_gram(losses, shared, scale, trainer, max(1, budget // (2 * size)))
            c = self.coefficients(gram, losses.detach())
            trainer.backward((c.to(losses.dtype) * losses).sum(), inputs=shared, retain_graph=True)
            trainer.backward(losses.sum(), inputs=specific)
        self.record(c)


def _saveable(value):
    """``value`` as tensors and plain containers (what a checkpoint may hold)."""
    if isinstance(value, torch.Generator):
        return {"generator_state": value.get_state()}
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_saveable(v) for v in value)
    if isinstance(value, dict):
        return {k: _saveable(v) for k, v in value.items()}
    return value


def run_generator() -> torch.Generator:
    """A generator for a weighting's own random draws (``rlw``'s weights, ``pcgrad``'s orders),
    seeded with the run's seed: the engine seeds torch with it before building the method, and
    ``torch.initial_seed`` returns that seed without drawing from the global stream. So seeds
    differ in these draws too, and the same seed repeats them."""
    return torch.Generator().manual_seed(torch.initial_seed())


def task_gradients(losses: torch.Tensor, params: list[torch.Tensor], scale: float, trainer) -> torch.Tensor:
    """Row t: the gradient of ``losses[t]`` on ``params``, flattened ``[T, P]`` (unscaled)."""
    rows = []
    for t in range(len(losses)):
        grads = torch.autograd.grad(trainer.scaled(losses[t]), params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                               for g, p in zip(grads, params, strict=True)]))
    return torch.stack(rows).float() / scale


def gram_of(grads: torch.Tensor) -> torch.Tensor:
    return (grads @ grads.t()).double()


def blocked_gram(losses: torch.Tensor, params: list[torch.Tensor], scale: float, trainer, block: int) -> torch.Tensor:
    """``G Gᵀ`` holding at most two blocks of ``block`` gradients at a time."""
    t = len(losses)
    gram = torch.zeros(t, t, dtype=torch.float64)
    starts = list(range(0, t, block))
    for i in starts:
        gi = task_gradients(losses[i:i + block], params, scale, trainer)
        gram[i:i + block, i:i + block] = gram_of(gi)
        for j in starts:
            if j >= i:
                break
            gj = task_gradients(losses[j:j + block], params, scale, trainer)
            cross = (gi @ gj.t()).double()
            gram[i:i + block, j:j + block] = cross
            gram[j:j + block, i:i + block] = cross.t()
    return gram


def last_shared_layer(method) -> list[torch.Tensor]:
    """The last shared layer's parameters: the last shared weight with two or more dimensions
    (a conv or linear weight) and the shared parameters after it (its norm's scale and shift)."""
    shared = method.shared_parameters()
    last = max((i for i, p in enumerate(shared) if p.dim() >= 2), default=0)
    return shared[last:]


# ----- small exact solvers shared by the gradient weightings -------------------------------
# They work on T x T Gram matrices in float64 NumPy: for these sizes NumPy's per-call cost is a
# fraction of torch's, and a solver runs once per training step.
def project_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto the probability simplex (Duchi et al., ICML 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    rho = np.nonzero(u - css / np.arange(1, len(v) + 1) > 0)[0][-1]
    return np.maximum(v - css[rho] / (rho + 1.0), 0.0)


def accelerated_simplex(grad, lipschitz: float, t: int, iters: int = 2000, tol: float = 1e-12) -> np.ndarray:
    """Minimise a smooth convex function over the simplex by accelerated projected gradient
    (FISTA) from the uniform point; ``grad(w)`` its gradient, ``lipschitz`` a bound on its
    gradient's Lipschitz constant. Stops when an iterate moves less than ``tol``."""
    w = y = np.full(t, 1.0 / t)
    momentum, step = 1.0, 1.0 / max(lipschitz, 1e-300)
    for _ in range(iters):
        w_next = project_simplex(y - step * grad(y))
        m_next = (1 + (1 + 4 * momentum ** 2) ** 0.5) / 2
        y = w_next + (momentum - 1) / m_next * (w_next - w)
        done = np.abs(w_next - w).max() < tol
        w, momentum = w_next, m_next
        if done:
            break
    return w


def min_norm_simplex(gram: torch.Tensor, iters: int = 2000) -> torch.Tensor:
    """argmin over the simplex of ``wᵀ gram w``: the min-norm point of the gradients' convex hull.

    Two tasks: the closed form. More: accelerated projected gradient, then a polish: on the
    support found, the optimality conditions (``gram w`` equal on the support) are solved as a
    linear system, which makes the answer exact when the support is right."""
    q = gram.detach().cpu().double().numpy()
    t = len(q)
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    scale = float(np.diag(q).max()) or 1.0
    q = q / scale
    if t == 2:
        denom = q[0, 0] + q[1, 1] - 2 * q[0, 1]
        gamma = 0.5 if denom <= 0 else min(max((q[1, 1] - q[0, 1]) / denom, 0.0), 1.0)
        return torch.tensor([gamma, 1.0 - gamma], dtype=torch.float64)
    w = accelerated_simplex(lambda v: q @ v, float(np.linalg.eigvalsh(q).max()), t, iters)
    support = w > 1e-9
    k = int(support.sum())
    a = np.zeros((k + 1, k + 1))
    a[:k, :k], a[:k, k], a[k, :k] = q[np.ix_(support, support)], -1.0, 1.0
    rhs = np.zeros(k + 1)
    rhs[k] = 1.0
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return torch.from_numpy(w)
    polished = np.zeros(t)
    polished[support] = sol[:k]
    if (polished >= 0).all() and polished @ q @ polished <= w @ q @ w + 1e-12:
        w = polished
    return torch.from_numpy(w)
