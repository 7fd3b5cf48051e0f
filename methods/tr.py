"""Task Routing (``tr``): one shared backbone, fixed per-task binary channel masks.

Strezoski, van Noord, Worring, "Many Task Learning with Task Routing", ICCV 2019,
arXiv 1903.12117.

Implemented: a task routing layer after every conv+norm (before the nonlinearity), masks
drawn once from a generator seeded by the run's seed with sharing ratio sigma (see
:func:`mtlbench.routing.draw_masks`), one linear head per task, and the paper's training
schedule (``sample``: each step updates one randomly drawn task) or ``all`` (every task each
step, losses summed).

Deviations from the paper: ``sample`` draws without replacement from ``steps_per_task``
copies of each task, so every task gets exactly the same number of batches; heads are
binary (one logit per task) since every mtlbench task is binary; a unit's batch-norm
running statistics are updated only by batches of tasks that keep it (the paper's code
updates them from every task's batches). Besides the masked dense form (the reference), a
compact form runs only each task's kept channels (``--tr-impl``, see mtlbench.compact).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from mtlbench.backbones import BackboneSpec
from mtlbench.compact import AllTaskInference, CompactRouting, chain, group_size
from mtlbench.errors import MtlbenchError
from mtlbench.method import Method, MethodConfig, TaskHeads, count, sample_schedule
from mtlbench.registry import register_method
from mtlbench.routing import insert_routers


# ``auto`` picks compact routing when tasks keep at most this fraction of units. Measured
# (T=40, batch 64, training step dense/compact): on a 2-core CPU sigma 0.5 (kept 0.52) 1.5x,
# sigma 0.75 (kept 0.76) 1.3-1.45x, sigma 0.9 (kept 0.90) 1.02-1.05x. On an H200 compact was
# slower at every sigma (0.59-0.77x for sigma 0 to 0.9, batch 64 and 256): the small kernels
# are launch-bound and the gathers add launches, so auto keeps the dense form on CUDA.
AUTO_MAX_KEPT = {"cpu": 0.85, "cuda": 0.0}
IMPLS = ("auto", "dense", "compact")
# All-task inference in eval mode (see mtlbench.compact.AllTaskInference). ``grouped`` runs
# several tasks per convolution call and beat ``loop`` over T masked passes (sigma 0.5, T=40)
# on a 2-core CPU (batch 250: 3.0x vs 2.5x) and more so on an H200 (batch 64: 9.4-10.1x vs
# 1.8x). ``auto`` takes grouped wherever folding is possible.
INFERENCE = ("auto", "grouped", "loop", "dense")


@dataclass
class TaskRoutingConfig(MethodConfig):
    impl: str = "auto"  # dense (masked reference), compact (active channels only) or auto
    inference: str = "auto"  # all-task inference in eval mode: grouped, loop, dense or auto


@register_method("tr", "Task Routing: shared backbone, fixed random per-task channel masks with sharing ratio sigma.")
class TaskRouting(Method):
    config_class = TaskRoutingConfig
    schedules = ("sample", "all")
    uses_sigma = True

    def __init__(self, backbone: BackboneSpec, num_tasks: int, config: MethodConfig, seed: int = 0) -> None:
        super().__init__(backbone, num_tasks, config, seed)
        self.backbone = backbone.build()
        self.heads = TaskHeads(self.backbone.num_features, num_tasks)
        self.routers, self.route_names = insert_routers(self.backbone, num_tasks, self.sigma, seed)
        if config.impl not in IMPLS:
            raise MtlbenchError(f"--tr-impl must be one of {', '.join(IMPLS)}, got {config.impl!r}")
        leaves = chain(self.backbone)
        self.compact = CompactRouting(leaves) if leaves is not None else None
        if config.impl == "compact" and self.compact is None:
            raise MtlbenchError("--tr-impl compact needs a plain conv-norm chain backbone (convnet, vgg11)")
        self.impl = "dense" if config.impl == "auto" else config.impl
        if config.inference not in INFERENCE:
            raise MtlbenchError(f"tr option inference must be one of {', '.join(INFERENCE)}, "
                                f"got {config.inference!r}")
        self.all_task = AllTaskInference(self.compact) if self.compact is not None else None
        if config.inference in ("grouped", "loop") and not (self.all_task and self.all_task.supported()):
            raise MtlbenchError(f"tr option inference={config.inference} needs a plain conv-norm chain backbone "
                                "whose norms keep running statistics")
        self.inference = config.inference
        if self.inference == "auto":
            self.inference = "grouped" if self.all_task is not None and self.all_task.supported() else "dense"

    def prepare(self, device: torch.device) -> None:
        if self.config.impl == "auto":
            kept = torch.cat([r.masks.mean(dim=1) for r in self.routers]).mean().item()
            limit = AUTO_MAX_KEPT.get(torch.device(device).type, 0.5)
            self.impl = "compact" if self.compact is not None and kept <= limit else "dense"

    @property
    def sigma(self) -> float:
        return self.config.sigma

    def schedule(self, steps_per_task: int, generator: torch.Generator) -> Iterator[list[int]]:
        if self.config.schedule == "sample":
            return sample_schedule(self.num_tasks, steps_per_task, generator)
        return super().schedule(steps_per_task, generator)

    @classmethod
    def total_steps(cls, num_tasks: int, steps_per_task: int, schedule: str) -> int:
        return steps_per_task * (num_tasks if schedule == "sample" else 1)

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
        kept = torch.cat([r.masks.mean(dim=1) for r in self.routers]).mean().item()
        return {"routing_points": self.route_names, "sigma": self.sigma, "impl": self.impl,
                "impl_requested": self.config.impl, "mean_kept_fraction": kept,
                "all_task_inference": self.inference if self.inference != "dense" else
                "dense (one masked pass per task)", "inference_requested": self.config.inference}
