"""Train and evaluate one run. Method-agnostic: it only uses the :class:`Method` interface."""
from __future__ import annotations

import dataclasses
import functools
import os
import random
import statistics
import time
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mtlbench.backbones import resolve_backbone
from mtlbench.config import RunConfig, make_config
from mtlbench.data import Batches, TaskDataset
from mtlbench.errors import MtlbenchError
from mtlbench.measure import PeakMemory, clock, count_flops, spread, tune_allocator
from mtlbench.method import Method
from mtlbench.registry import DATASETS, METHODS


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def set_determinism(device: torch.device, deterministic: bool) -> str:
    """Make the same seed give the same numbers on ``device``; returns what was done (recorded).

    The CPU kernels these methods use are deterministic as they are. On CUDA, cuDNN's
    autotuner and several kernels (convolution backward, index_add) are not: ``deterministic``
    turns on torch's deterministic algorithms (a warning, not an error, for any op without
    one), deterministic cuDNN and a fixed cuBLAS workspace.
    """
    if torch.device(device).type != "cuda":
        return "cpu kernels (deterministic)"
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = deterministic
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    return "torch.use_deterministic_algorithms, cudnn.deterministic" if deterministic else "off (--nondeterministic)"


HOLDOUT_SEED = 0  # the carve is the same for every method and seed, so runs stay comparable


def load_data(cfg: RunConfig, root: str | None = None, download: bool = False) -> tuple[TaskDataset, TaskDataset]:
    """Training and evaluation data of ``cfg.dataset`` with ``cfg.tasks`` tasks.

    The official train and test splits, or, with ``cfg.holdout`` = f, ``cfg.holdout_split``
    carved at random (fixed seed) into a (1 - f) training part and an f evaluation part.
    """
    cls = DATASETS.get(cfg.dataset)
    options = make_config(cls.config_class, cfg.dataset_options, f"dataset {cfg.dataset!r}")
    kwargs = {"num_tasks": cfg.tasks, "config": options, "download": download}
    if cfg.task_names:
        kwargs["task_names"] = list(cfg.task_names)
    if not cfg.holdout:
        return cls(root, "train", **kwargs), cls(root, "test", **kwargs)
    if not 0.0 < cfg.holdout < 1.0:
        raise MtlbenchError(f"--holdout must be a fraction in (0, 1), got {cfg.holdout:g}")
    full = cls(root, cfg.holdout_split, **kwargs)
    n_eval = round(cfg.holdout * len(full))
    if not 0 < n_eval < len(full):
        raise MtlbenchError(f"--holdout {cfg.holdout:g} of {len(full)} images leaves an empty part")
    perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
    return full.subset(perm[n_eval:]), full.subset(perm[:n_eval])


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
    if cfg.tr_impl and "impl" in {f.name for f in dataclasses.fields(cls.config_class)}:
        options["impl"] = cfg.tr_impl
    for name in set(cfg.method_options) & {"sigma", "schedule"}:
        raise MtlbenchError(f"set {name} with --{name}, not as a method option")
    options.update(cfg.method_options)
    method_cfg = make_config(cls.config_class, options, f"method {cfg.method!r}")
    backbone = resolve_backbone(cfg.backbone, in_channels, cfg.backbone_options)
    seed_everything(cfg.seed)
    return cls(backbone, cfg.tasks, method_cfg, seed=cfg.seed)


def make_optimizer(model: Method, cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum, in torch's fused form where this torch has it.

    The fused step is one kernel over all parameters instead of a few per tensor: Adam's step
    for 40 stl columns takes 7 ms instead of 22 ms on a 2-core CPU (0.16 ms instead of 0.55
    ms for one routed backbone). ``optimizer_impl`` tells which form a model's step uses.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        make = functools.partial(torch.optim.Adam, params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        make = functools.partial(torch.optim.SGD, params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    else:
        raise MtlbenchError(f"unknown optimizer {cfg.optimizer!r}; valid: adam, sgd")
    try:
        return make(fused=True)
    except (RuntimeError, TypeError, ValueError):  # an older torch or an unsupported device
        return make()


def optimizer_impl(opt: torch.optim.Optimizer) -> str:
    return "fused" if opt.defaults.get("fused") else "per-tensor"


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(cfg: RunConfig):
    """Mixed precision for ``bf16``/``fp16`` (autocast); a no-op context for ``fp32``."""
    if cfg.precision not in PRECISIONS:
        raise MtlbenchError(f"--precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}")
    dtype = PRECISIONS[cfg.precision]
    return torch.autocast(torch.device(cfg.device).type, dtype=dtype, enabled=dtype is not None)


def tf32(device: torch.device) -> dict | None:
    """Whether fp32 matmuls and convolutions may run in TF32 on this CUDA device (torch's
    switches; by default cuDNN convolutions do, matmuls don't). None off CUDA."""
    if torch.device(device).type != "cuda":
        return None
    return {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32}


def task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum over the supervised tasks of each task's mean binary cross-entropy."""
    return F.binary_cross_entropy_with_logits(logits, labels.float(), reduction="mean") * logits.shape[1]


def train(model: Method, batches: Batches, cfg: RunConfig,
          progress: Callable[[int], None] | None = None) -> dict:
    """Run the method's schedule. Each task's k-th supervised batch is batch k of the stream."""
    model.train()
    opt = make_optimizer(model, cfg)
    # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
    scaler = torch.amp.GradScaler(torch.device(cfg.device).type, enabled=cfg.precision == "fp16")
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = [0] * model.num_tasks  # supervised batches per task so far
    steps, pairs, data_s, last_loss, step_s = 0, 0, 0.0, float("nan"), []
    start = time.perf_counter()
    for tasks in model.schedule(cfg.steps_per_task, generator):
        t0 = clock(cfg.device)
        x, y = batches.get(seen[tasks[0]])
        t1 = clock(cfg.device)
        data_s += t1 - t0
        with autocast(cfg):
            loss = task_loss(model(x, tasks).float(), y[:, tasks])
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at step {steps}")
        opt.zero_grad(set_to_none=True)  # so untouched parameters get no update (stl)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        for t in tasks:
            seen[t] += 1
        steps, pairs = steps + 1, pairs + len(x) * len(tasks)
        step_s.append((clock(cfg.device) - t1, len(x) * len(tasks)))
        if progress:
            progress(1)
        last_loss = loss.detach()
    seconds = clock(cfg.device) - start
    # Steady-state throughput: the first steps (allocator and kernel warm-up) are left out
    # and the median step time is used; the wall-clock figure is kept beside it.
    warm = min(5, len(step_s) // 4)
    steady = step_s[warm:]
    median_s = statistics.median(t / p for t, p in steady) if steady else float("nan")
    return {"steps": steps, "supervised_pairs": pairs, "seconds": seconds,
            "pairs_per_s": 1.0 / median_s if median_s else float("nan"),
            "pairs_per_s_wall": pairs / seconds if seconds else float("nan"),
            "step_time": spread([t for t, _ in steady]) if steady else None,
            "warmup_steps": warm, "data_seconds": data_s, "data_fraction": data_s / seconds,
            "final_loss": float(last_loss), "batches_per_task": sorted(set(seen)),
            "optimizer_impl": optimizer_impl(opt)}


@torch.no_grad()
def predict(model: Method, images: torch.Tensor, batches: Batches, batch_size: int,
            cfg: RunConfig) -> tuple[torch.Tensor, dict]:
    """Logits of every task for every image ``[N, T]``, and all-task inference throughput.

    Each evaluation batch is timed; the first is the warm-up and the median of the rest
    gives images per second (predictions for all T tasks, in the method's own way).
    """
    model.eval()
    out, times = [], []
    for i in range(0, len(images), batch_size):
        start = clock(cfg.device)
        with autocast(cfg):
            out.append(model.predict_all(batches.normalise(images[i:i + batch_size])).float())
        times.append((clock(cfg.device) - start, len(out[-1])))
    timed = times[1:] or times
    per_image = statistics.median(t / n for t, n in timed)
    return torch.cat(out), {"seconds": sum(t for t, _ in times), "images": len(images),
                            "images_per_s": 1.0 / per_image, "batch_time": spread([t for t, _ in timed]),
                            "warmup_batches": len(times) - len(timed)}


def method_flops(cfg: RunConfig, image_shape: tuple[int, ...]) -> dict:
    """FLOPs counted by ``torch.utils.flop_counter`` on the meta device (no compute).

    ``forward_per_image_task``: forward FLOPs to predict all T tasks for one image, over T.
    ``train_per_pair``: forward+backward FLOPs of one training step of the method's
    schedule, over its supervised (image, task) pairs.
    """
    with torch.device("meta"):
        model = build_method(cfg, image_shape[0])
    model.prepare(torch.device(cfg.device))  # masks are real tensors even here: see draw_masks
    device = "meta"
    if getattr(model, "impl", "dense") == "compact" or getattr(model, "inference", "dense") != "dense":
        # Gathering active channels needs real indices: count this one on the CPU (batch 2).
        model, device = build_method(cfg, image_shape[0]), "cpu"
        model.prepare(torch.device(cfg.device))
    else:
        model = model.to("meta")
    batch = 2  # FLOPs are linear in the batch; two images keep batch norm well defined
    x = torch.empty(batch, *image_shape, device=device)
    model.eval()
    forward = count_flops(lambda: model.predict_all(x[:1]))
    model.train()
    tasks = next(iter(model.schedule(1, torch.Generator().manual_seed(0))))
    train_step = count_flops(lambda: model(x, tasks).sum().backward())
    return {"forward_per_image_task": forward / cfg.tasks, "train_per_pair": train_step / (batch * len(tasks)),
            "counted_with": "torch.utils.flop_counter.FlopCounterMode (matmul/conv FLOPs, 2 per multiply-add)"}


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
    kept_heap = tune_allocator()
    determinism = set_determinism(device, cfg.deterministic)
    flops = method_flops(cfg, tuple(train_set.images.shape[1:]))
    with PeakMemory(cfg.device) as memory:
        model = build_method(cfg, train_set.images.shape[1]).to(device, memory_format=torch.channels_last)
        model.prepare(device)
        batches = Batches(train_set.images.to(device), train_set.labels.to(device), cfg.batch_size,
                          cfg.seed, train_set.mean, train_set.std)
        timing = train(model, batches, cfg, progress)
        logits, inference = predict(model, test_set.images.to(device), batches, cfg.eval_batch_size, cfg)
    metrics = binary_metrics(logits.cpu(), test_set.labels)
    return {
        "method_config": dataclasses.asdict(model.config),
        "metrics": {**metrics, "mean_accuracy": float(np.mean(metrics["accuracy"])),
                    "mean_balanced_accuracy": float(np.mean(metrics["balanced_accuracy"]))},
        "params": model.param_counts(),
        "method_details": model.describe(),
        "train": timing,
        "eval": inference,
        "flops": flops,
        "memory": {"peak_bytes": memory.bytes, "how": memory.how},
        "runtime": {"device": str(device), "threads": torch.get_num_threads(), "memory_format": "channels_last",
                    "precision": cfg.precision,
                    "allocator": "glibc, freed memory kept (mmap/trim thresholds 1 GiB)" if kept_heap else "default",
                    "autocast": cfg.precision != "fp32",
                    "grad_scaler": cfg.precision == "fp16", "tf32": tf32(device),
                    "deterministic": determinism},
        "data": {"task_names": test_set.task_names, "positive_rate_train": train_set.positive_rate(),
                 "positive_rate_test": test_set.positive_rate(),
                 "num_train": len(train_set), "num_test": len(test_set),
                 "options": dataclasses.asdict(train_set.config) if hasattr(train_set, "config") else {}},
    }
