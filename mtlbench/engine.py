"""Train and evaluate one run. Method-agnostic: it only uses the :class:`Method` interface."""
from __future__ import annotations

import dataclasses
import random
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mtlbench.backbones import resolve_backbone
from mtlbench.config import RunConfig, make_config
from mtlbench.data import Batches, TaskDataset
from mtlbench.errors import MtlbenchError
from mtlbench.method import Method
from mtlbench.registry import DATASETS, METHODS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig, root: str | None = None) -> tuple[TaskDataset, TaskDataset]:
    """The train and test splits of ``cfg.dataset`` with ``cfg.tasks`` tasks."""
    cls = DATASETS.get(cfg.dataset)
    options = make_config(cls.config_class, cfg.dataset_options, f"dataset {cfg.dataset!r}")
    return tuple(cls(root, split, num_tasks=cfg.tasks, config=options) for split in ("train", "test"))


def build_method(cfg: RunConfig, in_channels: int) -> Method:
    """Seed, then build the method: the same seed gives the same initial weights and masks."""
    cls = METHODS.get(cfg.method)
    schedule = cfg.schedule or cls.schedules[0]
    if schedule not in cls.schedules:
        raise MtlbenchError(f"method {cfg.method!r} supports schedule(s) {', '.join(cls.schedules)}, "
                            f"not {schedule!r}")
    sigma = cls.fixed_sigma if not cls.uses_sigma else cfg.sigma
    if sigma is not None and not 0.0 <= sigma <= 1.0:
        raise MtlbenchError(f"--sigma must be in [0, 1], got {sigma}")
    options = {"schedule": schedule, **({"sigma": sigma} if sigma is not None else {})}
    method_cfg = make_config(cls.config_class, options, f"method {cfg.method!r}")
    backbone = resolve_backbone(cfg.backbone, in_channels, cfg.backbone_options)
    seed_everything(cfg.seed)
    return cls(backbone, cfg.tasks, method_cfg, seed=cfg.seed)


def make_optimizer(model: Method, cfg: RunConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    raise MtlbenchError(f"unknown optimizer {cfg.optimizer!r}; valid: adam, sgd")


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the supervised tasks of each task's mean binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="mean") * logits.shape[1]


def train(model: Method, batches: Batches, cfg: RunConfig,
          progress: Callable[[int], None] | None = None) -> dict:
    """Run the method's schedule. Each task's k-th supervised batch is batch k of the stream."""
    model.train()
    opt = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = [0] * model.num_tasks  # supervised batches per task so far
    steps, pairs, data_s, last_loss = 0, 0, 0.0, float("nan")
    start = time.perf_counter()
    for tasks in model.schedule(cfg.steps_per_task, generator):
        t0 = time.perf_counter()
        x, y = batches.get(seen[tasks[0]])
        data_s += time.perf_counter() - t0
        loss = task_loss(model(x, tasks), y[:, tasks])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {steps}")
        opt.zero_grad(set_to_none=True)  # so untouched parameters get no update (stl)
        loss.backward()
        opt.step()
        for t in tasks:
            seen[t] += 1
        steps, pairs = steps + 1, pairs + len(x) * len(tasks)
        if progress:
            progress(1)
        last_loss = loss.detach()
    seconds = _sync_clock(cfg.device) - start
    return {"steps": steps, "supervised_pairs": pairs, "seconds": seconds,
            "pairs_per_s": pairs / seconds if seconds else float("nan"),
            "data_seconds": data_s, "final_loss": float(last_loss),
            "batches_per_task": sorted(set(seen))}


def _sync_clock(device: str) -> float:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


@torch.no_grad()
def predict(model: Method, images: torch.Tensor, batches: Batches, batch_size: int) -> torch.Tensor:
    """Logits of every task for every image, ``[N, T]``."""
    model.eval()
    out = [model.predict_all(batches.normalise(images[i:i + batch_size]))
           for i in range(0, len(images), batch_size)]
    return torch.cat(out)


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per-task accuracy and balanced accuracy (mean of the recalls of the classes present)."""
    pred, y = logits > 0, labels.bool()
    acc = (pred == y).float().mean(dim=0)
    pos, neg = y.sum(dim=0), (~y).sum(dim=0)
    tpr = (pred & y).sum(dim=0) / pos.clamp(min=1)
    tnr = (~pred & ~y).sum(dim=0) / neg.clamp(min=1)
    present = (pos > 0).float() + (neg > 0).float()
    bacc = (tpr * (pos > 0) + tnr * (neg > 0)) / present
    return {"accuracy": acc.tolist(), "balanced_accuracy": bacc.tolist()}


def execute(cfg: RunConfig, train_set: TaskDataset, test_set: TaskDataset,
            progress: Callable[[int], None] | None = None) -> dict:
    """Build, train and evaluate one method; returns the method-level part of a result."""
    device = torch.device(cfg.device)
    model = build_method(cfg, train_set.images.shape[1]).to(device, memory_format=torch.channels_last)
    batches = Batches(train_set.images.to(device), train_set.labels.to(device), cfg.batch_size,
                      cfg.seed, train_set.mean, train_set.std)
    timing = train(model, batches, cfg, progress)
    t0 = time.perf_counter()
    logits = predict(model, test_set.images.to(device), batches, cfg.eval_batch_size)
    eval_s = _sync_clock(cfg.device) - t0
    metrics = binary_metrics(logits.cpu(), test_set.labels)
    return {
        "method_config": dataclasses.asdict(model.config),
        "metrics": {**metrics, "mean_accuracy": float(np.mean(metrics["accuracy"])),
                    "mean_balanced_accuracy": float(np.mean(metrics["balanced_accuracy"]))},
        "params": model.param_counts(),
        "method_details": model.describe(),
        "train": timing,
        "eval": {"seconds": eval_s, "images": len(test_set), "images_per_s": len(test_set) / eval_s},
        "data": {"task_names": test_set.task_names, "positive_rate_train": train_set.positive_rate(),
                 "num_train": len(train_set), "num_test": len(test_set),
                 "options": dataclasses.asdict(train_set.config) if hasattr(train_set, "config") else {}},
    }
