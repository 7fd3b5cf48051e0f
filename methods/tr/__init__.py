"""Task Routing (``tr``): one shared backbone, fixed per-task binary channel masks.

Strezoski, van Noord, Worring, "Many Task Learning with Task Routing", ICCV 2019,
arXiv 1903.12117.

Implemented: a task routing layer after every conv+norm (before the nonlinearity), masks
drawn once from a generator seeded by the run's seed with sharing ratio sigma (see
:mod:`.masks`), one linear head per task, and three schedules: ``sample`` (each step updates
one randomly drawn task, every task getting exactly its budget), ``all`` (every task each
step, losses combined by the run's task weighting) and ``paper`` (the official loop: a fresh
batch and an i.i.d. task each step).

Options (``-o method.KEY=VALUE``; ``--sigma`` and ``--tr-impl`` are shorthands):

- ``sigma`` (0.5): the sharing ratio; ``masks`` (``own`` or ``paper``): the mask rule;
- ``bn_stats`` (``task``, ``kept`` or ``all``): how routed norms keep running statistics
  (:mod:`.routing`);
- ``impl`` (``auto``, ``dense``, ``compact``) and ``inference`` (``auto``, ``grouped``,
  ``loop``, ``dense``): implementations tested to give the same numbers (:mod:`.compact`,
  :mod:`.inference`); they are not part of a run's setting.

Deviations from the paper, each with a switch back:

- ``sample`` draws without replacement from ``batches_per_task`` copies of each task, so every
  task gets exactly the same number of batches, each task starting at its own offset into the
  stream of batches (``-o method.stream``, :func:`mtlbench.method._sample`) (``--schedule
  paper``: i.i.d. draws and a fresh batch each step, as the official code).
- Masks: a task keeps its own units plus a fraction sigma of the others, so that sigma=0 gives
  separate sub-networks (``-o method.masks=paper``: round(sigma * C) units at random, as the
  official code).
- Batch-norm statistics: one row per task where a norm's input depends on the task
  (``bn_stats=task``). With the official code's rule (``all``: every task updates every unit's
  statistics) or one row per unit (``kept``), eval-mode logits on MNIST were shifted far
  negative and some tasks predicted all-negative; the figures are in the README.
- Heads are binary (one logit per task), since every mtlbench task is binary.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mtlbench.backbones import BackboneSpec
from mtlbench.errors import MtlbenchError
from mtlbench.layers import group_size
from mtlbench.method import Method, TaskHeads, WeightedOptions, count
from mtlbench.methods.tr.compact import CompactRouting, chain
from mtlbench.methods.tr.inference import AllTaskInference
from mtlbench.methods.tr.masks import MASK_RULES
from mtlbench.methods.tr.routing import BN_STATS, insert_routers
from mtlbench.registry import register_method

# ``impl=auto`` picks compact routing when tasks keep at most this fraction of units (per
# device). The figures behind it: ``python tests/benchmarks/auto_rules.py --device cpu|cuda``
# (``compact_speedup_by_sigma``) and ``mtlbench bench`` (``tr_compact_speedup``).
AUTO_MAX_KEPT = {"cpu": 0.85, "cuda": 0.0}
IMPLS = ("auto", "dense", "compact")
# All-task inference in eval mode (see .inference). ``auto`` takes ``grouped`` wherever
# folding is possible; ``mtlbench bench`` prints each mode's speed-up
# (``tr_all_task_inference_by_mode``).
INFERENCE = ("auto", "grouped", "loop", "dense")


@dataclass
class RoutingOptions(WeightedOptions):
    """Options of routed methods (``tr``, ``separate``)."""

    bn_stats: str = "task"   # task, kept or all (see .routing)
    impl: str = "auto"       # dense (masked reference), compact (active channels only) or auto
    inference: str = "auto"  # all-task inference in eval mode: grouped, loop, dense or auto


@dataclass
class TaskRoutingOptions(RoutingOptions):
    sigma: float = 0.5       # the sharing ratio
    masks: str = "own"       # own or paper (see .masks)


@register_method("tr", "Task Routing: shared backbone, fixed random per-task channel masks with sharing ratio sigma.")
class TaskRouting(Method):
    options_class = TaskRoutingOptions
    schedules = ("sample", "all", "paper")
    implementation_options = ("impl", "inference")
    label_options = ("sigma",)
    fixed_sigma: float | None = None  # separate sits at 0

    @classmethod
    def check_options(cls, o: RoutingOptions) -> None:
        sigma = getattr(o, "sigma", cls.fixed_sigma)
        if not 0.0 <= sigma <= 1.0:
            raise MtlbenchError(f"--sigma must be in [0, 1], got {sigma:g}")
        masks = getattr(o, "masks", "own")
        if masks not in MASK_RULES:
            raise MtlbenchError(f"tr option masks must be one of {', '.join(MASK_RULES)}, got {masks!r}")
        if masks == "paper" and sigma == 0.0:
            raise MtlbenchError("tr option masks=paper keeps round(sigma * C) units per task: sigma=0 keeps none")
        if o.bn_stats not in BN_STATS:
            raise MtlbenchError(f"{cls.name} option bn_stats must be one of {', '.join(BN_STATS)}, got {o.bn_stats!r}")
        if o.impl not in IMPLS:
            raise MtlbenchError(f"--tr-impl must be one of {', '.join(IMPLS)}, got {o.impl!r}")
        if o.inference not in INFERENCE:
            raise MtlbenchError(f"{cls.name} option inference must be one of {', '.join(INFERENCE)}, "
                                f"got {o.inference!r}")
        if o.impl == "compact" and o.bn_stats == "all":
            raise MtlbenchError("--tr-impl compact cannot keep bn_stats=all: the statistics of units a task drops "
                                "are never computed; use the dense form")

    @classmethod
    def label(cls, options: dict) -> str:
        base = super().label(options).replace("sigma=", "σ=")
        extra = [f"{k}={options[k]}" for k, default in (("masks", "own"), ("bn_stats", "task"))
                 if options.get(k, default) != default]
        if options.get("schedule") not in (None, cls.schedules[0]):
            extra.append(f"schedule={options['schedule']}")
        return " ".join([base, *extra])

    def __init__(self, backbone: BackboneSpec, num_tasks: int, options: RoutingOptions, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, options, seed)
        self.sigma = getattr(options, "sigma", self.fixed_sigma)
        self.backbone = backbone.build()
        self.heads = TaskHeads(self.backbone.num_features, num_tasks)
        self.routers, self.routed, self.route_names = insert_routers(
            self.backbone, num_tasks, self.sigma, seed, getattr(options, "masks", "own"), options.bn_stats)
        leaves = chain(self.backbone)
        self.compact = CompactRouting(leaves) if leaves is not None else None
        self.compact_trains = self.compact is not None and self.compact.supported()
        if options.impl == "compact" and not self.compact_trains:
            raise MtlbenchError("--tr-impl compact needs a plain conv-norm chain backbone (convnet, vgg11); on other "
                                "backbones (timm:NAME) use --tr-impl dense or auto")
        self.impl = "dense" if options.impl == "auto" else options.impl
        self.impl_reason = "requested" if options.impl != "auto" else "auto: resolved on the device"
        self.all_task = AllTaskInference(self.compact) if self.compact is not None else None
        if options.inference in ("grouped", "loop") and not (self.all_task and self.all_task.supported()):
            raise MtlbenchError(f"{self.name} option inference={options.inference} needs a plain conv-norm chain "
                                "backbone whose norms keep running statistics, and bn_stats task or kept")
        self.inference = options.inference
        if self.inference == "auto":
            self.inference = "grouped" if self.all_task is not None and self.all_task.supported() else "dense"

    def prepare(self, device: torch.device) -> None:
        if self.options.impl == "auto":
            limit = AUTO_MAX_KEPT.get(torch.device(device).type, 0.5)
            self.impl = "compact" if self.compact_trains and self.kept_fraction() <= limit else "dense"
            self.impl_reason = (
                "auto: dense, the backbone is not a plain conv-norm chain (compact needs convnet or vgg11)"
                if self.compact is None else
                f"auto: {self.impl}, mean kept fraction {self.kept_fraction():.2f} "
                f"{'<=' if self.impl == 'compact' else '>'} {limit} on {torch.device(device).type}"
                if self.compact_trains else "auto: dense, compact cannot keep these batch-norm statistics")

    def kept_fraction(self) -> float:
        return torch.cat([r.masks.mean(dim=1) for r in self.routers]).mean().item()

    def set_task(self, task: int) -> None:
        for router in self.routers:
            router.task = task

    def forward(self, x: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        if self.impl == "compact":  # several tasks share the first layer's work
            per_task = self.compact.forward_many(x, tasks) if len(tasks) > 1 else [self.compact.forward(x, tasks[0])]
            return torch.stack([(features * self.heads.weight[t].index_select(0, idx)).sum(dim=-1) + self.heads.bias[t]
                                for t, (features, idx) in zip(tasks, per_task, strict=True)], dim=1)
        logits = []
        for t in tasks:  # one pass per task: the routed sub-networks differ
            self.set_task(t)
            logits.append(self.heads.one(self.backbone(x), t))
        return torch.stack(logits, dim=1)

    def predict_all(self, x: torch.Tensor) -> torch.Tensor:
        if self.training or self.inference == "dense":
            return super().predict_all(x)  # one routed pass per task, in the training impl
        per_task = x.shape[0] * self.all_task.activation_elements(x) * x.element_size()
        group = group_size(per_task, self.num_tasks, x.device)
        return self.all_task(x, self.heads.weight, self.heads.bias, self.inference, group)

    def flop_device(self) -> str:
        # gathering active channels needs real indices
        return "cpu" if self.impl == "compact" or self.inference != "dense" else "meta"

    def param_counts(self) -> dict:
        kept = torch.stack([r.masks.sum(dim=1) for r in self.routers]).sum(dim=0)  # [T]
        return {
            "trainable": count(self),
            "shared": count(self.backbone),
            "task_specific": count(self.heads),
            "active_units_per_task": kept.long().tolist(),
            "total_units": sum(r.masks.shape[1] for r in self.routers),
        }

    def describe(self) -> dict:
        return {"routing_points": self.route_names, "sigma": self.sigma, "impl": self.impl,
                "impl_requested": self.options.impl, "impl_reason": self.impl_reason,
                "mean_kept_fraction": self.kept_fraction(),
                "bn_stats": self.options.bn_stats,
                "per_task_statistics": [name for name, r in zip(self.route_names, self.routed) if r.per_task],
                "all_task_inference": self.inference if self.inference != "dense" else
                "dense (one masked pass per task)", "inference_requested": self.options.inference}

    @classmethod
    def bench_figures(cls, bench) -> dict:
        from mtlbench.methods.tr.bench import figures
        return figures(bench)
