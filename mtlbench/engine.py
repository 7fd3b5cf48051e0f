"""Train and evaluate one run under the protocol, through the :class:`Method` interface.

The protocol, the same for every method:

- **Data**: the training split (or the part of ``holdout_split`` left after carving the test
  part off) loses a validation part (``val_fraction``, stratified by task, with a fixed seed:
  the same images for every method and seed). The test split is never looked at until the end.
- **Budget**: every task gets the same number of supervised batches, given in epochs (passes
  over the training images) or in batches per task; the dataset declares a default.
- **Optimiser**: Adam (or SGD), one learning rate, cosine decay after a linear warm-up (or
  constant), stepped once per optimiser step of the method's schedule.
- **Loss**: each task's mean binary cross-entropy, its positives weighted by negatives over
  positives under ``pos_weight=auto``; the method's training step combines them.
- **Evaluation and selection**: the validation split is scored during training; the result's
  headline metrics are the test metrics of the checkpoint with the best mean validation
  balanced accuracy, and the final checkpoint's test metrics are kept beside them
  (``metrics_final``). Optional early stopping after ``patience`` evaluations without
  improvement.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import os
import random
import re
import statistics
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from mtlbench.backbones import resolve_backbone
from mtlbench.checkpoint import RunCheckpoint, rng_state, set_rng_state
from mtlbench.config import RunConfig, make_config
from mtlbench.data import Batches, TaskDataset, positive_weights, stratified_carve
from mtlbench.errors import MtlbenchError
from mtlbench.measure import PeakMemory, clock, count_flops, spread, tune_allocator
from mtlbench.method import Budget, Method
from mtlbench.metrics import binary_metrics, means
from mtlbench.registry import DATASETS, METHODS
from mtlbench.results import git_commit


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


HOLDOUT_SEED = 0  # the carves are the same for every method and seed, so runs stay comparable
VAL_SEED = 1


@dataclasses.dataclass
class Splits:
    train: TaskDataset
    val: TaskDataset | None
    test: TaskDataset


def load_data(cfg: RunConfig, root: str | None = None, download: bool = False) -> Splits:
    """Training, validation and test data of ``cfg.dataset`` with ``cfg.tasks`` tasks.

    The official train and test splits, or, with ``cfg.holdout`` = f, ``cfg.holdout_split``
    carved at random (fixed seed) into a (1 - f) training part and an f test part. The
    validation part is then carved off the training part (see :func:`carve_validation`).
    """
    cls = DATASETS.get(cfg.dataset)
    options = make_config(cls.config_class, cfg.dataset_options, f"dataset {cfg.dataset!r}")
    kwargs = {"num_tasks": cfg.tasks, "config": options, "download": download}
    if cfg.task_names:
        kwargs["task_names"] = list(cfg.task_names)
    if not cfg.holdout:
        train, test = cls(root, "train", **kwargs), cls(root, "test", **kwargs)
    else:
        if not 0.0 < cfg.holdout < 1.0:
            raise MtlbenchError(f"--holdout must be a fraction in (0, 1), got {cfg.holdout:g}")
        full = cls(root, cfg.holdout_split, **kwargs)
        n_eval = round(cfg.holdout * len(full))
        if not 0 < n_eval < len(full):
            raise MtlbenchError(f"--holdout {cfg.holdout:g} of {len(full)} images leaves an empty part")
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(HOLDOUT_SEED))
        train, test = full.subset(perm[n_eval:]), full.subset(perm[:n_eval])
    train, val = carve_validation(train, cfg.val_fraction)
    return Splits(train, val, test)


def carve_validation(train: TaskDataset, fraction: float) -> tuple[TaskDataset, TaskDataset | None]:
    """``fraction`` of ``train`` as the validation split, stratified by task with a fixed seed
    (the same images for every method and seed). Every task must keep positives and negatives
    on both sides, or the carve is refused with the reason."""
    if not fraction:
        return train, None
    if not 0.0 < fraction < 1.0:
        raise MtlbenchError(f"--val-fraction must be 0 (no validation) or a fraction in (0, 1), got {fraction:g}")
    rest, carved = stratified_carve(train.labels, fraction, VAL_SEED)
    for name, idx in (("validation", carved), ("training", rest)):
        y = train.labels[idx].bool()
        short = [(train.task_names[t], int(y[:, t].sum()), int((~y[:, t]).sum())) for t in range(y.shape[1])
                 if not y[:, t].any() or y[:, t].all()]
        if short:
            task, pos, neg = short[0]
            raise MtlbenchError(f"--val-fraction {fraction:g} leaves task {task!r} with {pos} positives and {neg} "
                                f"negatives in the {name} part ({len(short)} such task(s)); the training split "
                                "has too few images of a class: use fewer tasks, another --val-fraction, or 0")
    return train.subset(rest), train.subset(carved)


def resolve_budget(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its budget filled in from the dataset's default when none was given."""
    if cfg.epochs is not None and cfg.steps_per_task is not None:
        raise MtlbenchError("give the budget as --epochs or as --steps-per-task, not both")
    if cfg.epochs is None and cfg.steps_per_task is None:
        default = dataset_budget(cfg)
        cfg = dataclasses.replace(cfg, epochs=default.get("epochs"), steps_per_task=default.get("steps_per_task"))
    if cfg.epochs is not None and not (cfg.epochs > 0 and math.isfinite(cfg.epochs)):
        raise MtlbenchError(f"--epochs must be a positive number, got {cfg.epochs}")
    if cfg.steps_per_task is not None and cfg.steps_per_task < 1:
        raise MtlbenchError(f"--steps-per-task must be at least 1, got {cfg.steps_per_task}")
    return cfg


def dataset_budget(cfg: RunConfig) -> dict:
    """The budget ``cfg.dataset`` declares for its options."""
    cls = DATASETS.get(cfg.dataset)
    return cls.budget_for(make_config(cls.config_class, cfg.dataset_options, f"dataset {cfg.dataset!r}"))


def make_budget(cfg: RunConfig, train_size: int) -> Budget:
    if cfg.batch_size > train_size:
        raise MtlbenchError(f"--batch-size {cfg.batch_size} is larger than the training set ({train_size} images)")
    per_epoch = train_size // cfg.batch_size
    cfg = resolve_budget(cfg)
    if cfg.epochs is not None:
        return Budget(max(1, round(cfg.epochs * per_epoch)), per_epoch, cfg.epochs)
    return Budget(cfg.steps_per_task, per_epoch)


def method_options(cfg: RunConfig) -> dict:
    """The method's resolved options (idempotent on options already resolved)."""
    return METHODS.get(cfg.method).resolve_options(cfg.method_options)


def build_method(cfg: RunConfig, in_channels: int) -> Method:
    """Seed, then build the method: the same seed gives the same initial weights and masks."""
    cls = METHODS.get(cfg.method)
    options = cls.options_from(method_options(cfg))
    data = DATASETS.get(cfg.dataset)
    backbone = resolve_backbone(cfg.backbone, in_channels, cfg.backbone_options, (data.mean, data.std))
    seed_everything(cfg.seed)
    return cls(backbone, cfg.tasks, options, seed=cfg.seed)


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig) -> torch.optim.Optimizer:
    """Adam or SGD with momentum, in torch's fused form where this torch has it (one kernel
    over all parameters instead of a few per tensor). ``optimizer_impl`` tells which form."""
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


LR_SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, total: int, schedule: str, warmup: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) over ``lr``: a linear warm-up over
    ``warmup * total`` steps, then cosine decay to 0 at ``total``; or 1 throughout."""
    if schedule == "constant":
        return 1.0
    warm = round(warmup * total)
    if step < warm:
        return (step + 1) / (warm + 1)
    progress = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


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


class Trainer:
    """What a method's training step uses: the optimiser (with the task weighting's own
    parameters), precision, the per-task loss and the task weighting.

    ``optimize=False`` builds one without an optimiser (for counting a step's FLOPs).
    """

    def __init__(self, model: Method, cfg: RunConfig, total_steps: int, pos_weight: torch.Tensor | None = None,
                 optimize: bool = True, steps_per_epoch: int = 1) -> None:
        self.cfg = cfg
        self.weighting = model.make_weighting().to(next(model.parameters()).device)
        self.weighting.configure(total_steps, steps_per_epoch)
        params = [p for p in (*model.parameters(), *self.weighting.parameters()) if p.requires_grad]
        self.params = params
        self.optimizer = make_optimizer(params, cfg) if optimize else None
        self.scheduler = None
        if self.optimizer is not None:
            if cfg.lr_schedule not in LR_SCHEDULES:
                raise MtlbenchError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                self.optimizer, lambda s: lr_factor(s, total_steps, cfg.lr_schedule, cfg.warmup))
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none.
        self.scaler = torch.amp.GradScaler(torch.device(cfg.device).type,
                                           enabled=optimize and cfg.precision == "fp16")
        self.pos_weight = pos_weight

    def autocast(self):
        return autocast(self.cfg)

    def losses(self, logits: torch.Tensor, labels: torch.Tensor, tasks: list[int]) -> torch.Tensor:
        """Each task's mean binary cross-entropy ``[len(tasks)]`` (in fp32)."""
        pw = None if self.pos_weight is None else self.pos_weight[tasks]
        return F.binary_cross_entropy_with_logits(logits.float(), labels[:, tasks].float(), pos_weight=pw,
                                                  reduction="none").mean(dim=0)

    def zero_grad(self) -> None:
        for p in self.params:  # so untouched parameters get no update (stl)
            p.grad = None

    def scaled(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def grad_scale(self) -> float:
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def backward(self, loss: torch.Tensor, inputs: list | None = None, retain_graph: bool = False) -> None:
        if inputs is not None:
            inputs = [p for p in inputs if p.requires_grad]
            if not inputs:
                return
        self.scaled(loss).backward(inputs=inputs, retain_graph=retain_graph)

    def step(self) -> None:
        if self.optimizer is None:
            return
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"] if self.optimizer is not None else float("nan")


def eval_steps(spec: str, total: int, budget: Budget) -> list[int]:
    """The optimiser steps after which the validation split is scored (always the last).

    ``auto``: 10 evaluations, evenly spread; ``N``: every N steps; ``Xep``: every X epochs of
    the budget (X / epochs of the way through the schedule)."""
    spec = str(spec).strip()
    if spec == "auto":
        points = {max(1, round(total * k / 10)) for k in range(1, 11)}
    elif re.fullmatch(r"[0-9]+", spec) and int(spec) > 0:
        points = set(range(int(spec), total + 1, int(spec)))
    elif re.fullmatch(r"[0-9]*\.?[0-9]+ep", spec) and float(spec[:-2]) > 0:
        every = float(spec[:-2]) / budget.total_epochs
        points = {max(1, round(total * every * k)) for k in range(1, int(1 / every) + 1)}
    else:
        raise MtlbenchError(f"--eval-every takes auto, a number of steps (500) or of epochs (0.5ep), got {spec!r}")
    return sorted(p for p in points | {total} if p <= total)


SELECTION_METRIC = "mean_balanced_accuracy"
PROBE_STEPS = 4  # timed training steps (after a first, untimed one) behind a time-budget projection
DIVERGED = 10.0  # a training loss this many times its starting value, averaged between evaluations


class Diverged(FloatingPointError):
    """Training whose loss ran away (recorded as a failed run with the reason)."""


class OverBudget(Exception):
    """A run whose projected training time exceeds ``--max-train-seconds`` (recorded as skipped)."""

    def __init__(self, reason: str, details: dict) -> None:
        super().__init__(reason)
        self.details = details


def training_state(model: Method, trainer: Trainer) -> dict:
    """Everything of a run's training that the numbers depend on, but the loop's counters."""
    return {"model": model.state_dict(),
            "optimizer": None if trainer.optimizer is None else trainer.optimizer.state_dict(),
            "scheduler": None if trainer.scheduler is None else trainer.scheduler.state_dict(),
            "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
            "weighting": trainer.weighting.training_state(), "rng": rng_state()}


def restore_training(model: Method, trainer: Trainer, state: dict) -> None:
    model.load_state_dict(state["model"])
    if trainer.optimizer is not None:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"] is not None:
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.weighting.load_training_state(state["weighting"])
    set_rng_state(state["rng"])


def train(model: Method, batches: Batches, cfg: RunConfig, budget: Budget, val: tuple | None = None,
          pos_weight: torch.Tensor | None = None, progress: Callable[[int], None] | None = None,
          max_seconds: float | None = None, checkpoint: RunCheckpoint | None = None) -> dict:
    """Run the method's schedule under the protocol; ``val`` is (images, labels) or None.

    Returns the training record, with the best-validation state (``best_state``, popped by
    :func:`execute`) when there is a validation split. With ``max_seconds``, the first steps
    are timed and a run projected to train longer raises :class:`OverBudget`. With
    ``checkpoint``, the training state is saved at evaluation points and a saved state of
    this run is resumed from (see :mod:`mtlbench.checkpoint`)."""
    model.train()
    schedule = model.options.schedule
    total = model.total_steps(model.num_tasks, budget, schedule)
    trainer = Trainer(model, cfg, total, pos_weight, steps_per_epoch=max(1, round(total / budget.total_epochs)))
    weighted = "weighting" in method_options(cfg)  # a schedule that supervises several tasks
    points = set(eval_steps(cfg.eval_every, total, budget))
    generator = torch.Generator().manual_seed(cfg.seed)
    seen = [0] * model.num_tasks  # supervised batches per task so far
    steps, pairs, data_s, step_s, eval_s = 0, 0, 0.0, [], 0.0
    window, curve, best, stopped = [], [], None, None
    first_loss = mean_loss = None
    start = clock(cfg.device)
    plan = model.schedule(budget, generator)
    resumed = []
    saved = checkpoint.load(total) if checkpoint is not None else None
    if saved is not None:
        loop = saved["loop"]
        restore_training(model, trainer, saved)
        steps, pairs, data_s, step_s, eval_s = (loop[k] for k in ("steps", "pairs", "data_s", "step_s", "eval_s"))
        window, curve, best, seen = (loop[k] for k in ("window", "curve", "best", "seen"))
        first_loss, mean_loss = loop["first_loss"], loop["mean_loss"]
        start = clock(cfg.device) - loop["elapsed"]
        resumed = [*saved["resumed"], {"step": steps, "saved": saved["saved"], "saved_by_commit": saved["commit"]}]
        plan = itertools.islice(plan, steps, None)  # the schedule is replayed from its seed to that step
        if progress:
            progress(steps)
    for tasks, k in plan:
        t0 = clock(cfg.device)
        x, y = batches.get(k)
        t1 = clock(cfg.device)
        data_s += t1 - t0
        losses = model.train_step(x, y, tasks, trainer)
        total_loss = float(losses.sum())
        if not math.isfinite(total_loss):
            raise Diverged(f"diverged: non-finite loss {total_loss} at step {steps + 1}")
        trainer.scheduler.step()
        for t in tasks:
            seen[t] += 1
        steps, pairs = steps + 1, pairs + len(x) * len(tasks)
        step_s.append((clock(cfg.device) - t1, len(x) * len(tasks)))
        mean_loss = total_loss / len(tasks)
        first_loss = mean_loss if first_loss is None else first_loss
        window.append(mean_loss)
        if progress:
            progress(1)
        if max_seconds is not None and steps == PROBE_STEPS + 1:
            probe = statistics.median(t for t, _ in step_s[1:])
            if probe * total > max_seconds:
                raise OverBudget(f"projected training time {probe * total:,.0f} s ({total:,} steps of {probe:.3g} s) "
                                 f"exceeds --max-train-seconds {max_seconds:g}",
                                 {"probe_step_seconds": probe, "probe_steps": PROBE_STEPS, "steps_planned": total,
                                  "projected_seconds": probe * total})
        if steps in points:
            t_eval = clock(cfg.device)
            point = {"step": steps, "pairs": pairs, "epoch": pairs / (budget.per_epoch * cfg.batch_size * model.num_tasks),
                     "lr": trainer.lr(), "train_loss": statistics.fmean(window)}
            window = []
            if point["train_loss"] > DIVERGED * first_loss:
                raise Diverged(f"diverged: mean training loss {point['train_loss']:.3g} by step {steps}, "
                               f"{point['train_loss'] / first_loss:.0f}x its starting value {first_loss:.3g}")
            if val is not None:
                logits, _ = predict(model, val[0], batches, cfg.eval_batch_size, cfg)
                point["val"] = means(binary_metrics(logits, val[1]))
                model.train()
                score = point["val"][SELECTION_METRIC]
                if best is None or score > best["value"]:
                    best = {"value": score, "step": steps, "pairs": pairs, "evaluation": len(curve),
                            "state": {n: v.detach().clone() for n, v in model.state_dict().items()}}
            curve.append(point)
            eval_s += clock(cfg.device) - t_eval
            if val is not None and cfg.patience and len(curve) - 1 - best["evaluation"] >= cfg.patience:
                stopped = {"step": steps, "pairs": pairs, "reason": f"no better mean validation balanced accuracy "
                           f"in {cfg.patience} evaluations (best at step {best['step']})"}
                break
            if checkpoint is not None and steps < total and checkpoint.due():
                t_save = clock(cfg.device)
                loop = {"steps": steps, "pairs": pairs, "data_s": data_s, "step_s": step_s, "eval_s": eval_s,
                        "window": window, "curve": curve, "best": best, "seen": seen, "first_loss": first_loss,
                        "mean_loss": mean_loss, "elapsed": t_save - start}
                checkpoint.save({"steps_planned": total, "loop": loop, "resumed": resumed,
                                 "commit": git_commit(), **training_state(model, trainer)})
                eval_s += clock(cfg.device) - t_save  # saving is not training time
    seconds = clock(cfg.device) - start - eval_s
    # Steady-state throughput: the first steps (allocator and kernel warm-up) are left out
    # and the median step time is used; the wall-clock figure is kept beside it.
    warm = min(5, len(step_s) // 4)
    steady = step_s[warm:]
    median_s = statistics.median(t / p for t, p in steady) if steady else float("nan")
    record = {
        "steps": steps, "steps_planned": total, "supervised_pairs": pairs, "seconds": seconds,
        "eval_seconds": eval_s, "pairs_per_s": 1.0 / median_s if median_s else float("nan"),
        "pairs_per_s_wall": pairs / seconds if seconds else float("nan"),
        "step_time": spread([t for t, _ in steady]) if steady else None,
        "warmup_steps": warm, "data_seconds": data_s, "data_fraction": data_s / seconds if seconds else 0.0,
        "first_loss": first_loss, "final_loss": mean_loss if steps else float("nan"),
        "batches_per_task": sorted(set(seen)),
        "budget": {"batches_per_task": budget.batches_per_task, "batches_per_epoch": budget.per_epoch,
                   "epochs": budget.total_epochs,
                   "given_as": "epochs" if budget.epochs is not None else "steps_per_task",
                   "dataset_default": dataset_budget(cfg)},
        "lr_schedule": {"name": cfg.lr_schedule, "warmup": cfg.warmup, "base_lr": cfg.lr},
        "optimizer_impl": optimizer_impl(trainer.optimizer), "curve": curve, "stopped_early": stopped,
        "selection": None if best is None else {
            "metric": SELECTION_METRIC, "split": "validation", "best_value": best["value"], "best_step": best["step"],
            "best_pairs": best["pairs"], "evaluations": len(curve)},
        "best_state": None if best is None else best["state"],
        "checkpoints": None if checkpoint is None else {
            "every_seconds": checkpoint.every, "saved": checkpoint.saves, "save_seconds": checkpoint.seconds,
            "resumed": resumed},
    }
    if weighted:
        record["weighting"] = trainer.weighting.summary()
    return record


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
    """FLOPs counted by ``torch.utils.flop_counter`` (on the meta device where possible).

    ``forward_per_image_task``: forward FLOPs to predict all T tasks for one image, over T.
    ``train_per_pair``: FLOPs of one training step of the method (its own ``train_step``, the
    task weighting's extra backward passes included; the optimiser update left out), over its
    supervised (image, task) pairs.
    """
    with torch.device("meta"):
        model = build_method(cfg, image_shape[0])
    model.prepare(torch.device(cfg.device))
    device = model.flop_device()
    if method_options(cfg).get("weighting", "ew") != "ew":
        device = "cpu"  # weightings read the values of losses and gradients
    if device != "meta":
        model = build_method(cfg, image_shape[0]).to(device)
        model.prepare(torch.device(cfg.device))
    else:
        model = model.to("meta")  # masks are drawn on the CPU even here
    batch = 2  # FLOPs are linear in the batch; two images keep batch norm well defined
    x = torch.randn(batch, *image_shape, device=device) if device != "meta" else \
        torch.empty(batch, *image_shape, device=device)
    y = torch.zeros(batch, cfg.tasks, device=device)
    model.eval()
    forward = count_flops(lambda: model.predict_all(x[:1]))
    model.train()
    budget = Budget(1, 1, None)
    tasks, _ = next(iter(model.schedule(budget, torch.Generator().manual_seed(0))))
    trainer = Trainer(model, dataclasses.replace(cfg, precision="fp32"), 1, optimize=False)
    train_step = count_flops(lambda: model.train_step(x, y, tasks, trainer))
    return {"forward_per_image_task": forward / cfg.tasks, "train_per_pair": train_step / (batch * len(tasks)),
            "counted_with": "torch.utils.flop_counter.FlopCounterMode (matmul/conv FLOPs, 2 per multiply-add)",
            "counted_on": device}


def execute(cfg: RunConfig, data: Splits, progress: Callable[[int], None] | None = None,
            max_train_seconds: float | None = None, checkpoint: RunCheckpoint | None = None) -> dict:
    """Build, train and evaluate one method; returns the method-level part of a result."""
    device = torch.device(cfg.device)
    cfg = resolve_budget(cfg)
    kept_heap = tune_allocator()
    determinism = set_determinism(device, cfg.deterministic)
    train_set, val_set, test_set = data.train, data.val, data.test
    budget = make_budget(cfg, len(train_set))
    flops = method_flops(cfg, tuple(train_set.images.shape[1:]))
    if cfg.pos_weight not in ("auto", "none"):
        raise MtlbenchError(f"--pos-weight must be auto or none, got {cfg.pos_weight!r}")
    pos_weight = positive_weights(train_set.labels).to(device) if cfg.pos_weight == "auto" else None
    over = None
    with PeakMemory(cfg.device) as memory:
        model = build_method(cfg, train_set.images.shape[1]).to(device, memory_format=torch.channels_last)
        model.prepare(device)
        batches = Batches(train_set.images.to(device), train_set.labels.to(device), cfg.batch_size,
                          cfg.seed, train_set.mean, train_set.std)
        val = None if val_set is None else (val_set.images.to(device), val_set.labels)
        try:
            timing = train(model, batches, cfg, budget, val, pos_weight, progress, max_train_seconds, checkpoint)
        except OverBudget as exc:
            over = exc
    if over is not None:  # what the probe measured is kept with the skipped run
        over.details.update(peak_memory_bytes=memory.bytes, memory_how=memory.how, flops=flops,
                            params=model.param_counts())
        raise over
    with PeakMemory(cfg.device, reset=False) as after:
        best_state = timing.pop("best_state")
        test_images = test_set.images.to(device)
        logits, inference = predict(model, test_images, batches, cfg.eval_batch_size, cfg)
        final = binary_metrics(logits, test_set.labels)
        if best_state is not None:
            model.load_state_dict(best_state)
            del best_state
            logits, _ = predict(model, test_images, batches, cfg.eval_batch_size, cfg)
            selected = binary_metrics(logits, test_set.labels)
        else:
            selected = final
    return {
        "config_resolved": {"epochs": cfg.epochs, "steps_per_task": cfg.steps_per_task},
        "method_config": method_options(cfg),
        "metrics": {**selected, **means(selected),
                    "checkpoint": "best validation" if timing["selection"] else "final (no validation split)"},
        "metrics_final": {**final, **means(final)},
        "params": model.param_counts(),
        "method_details": model.describe(),
        "backbone_details": model.backbone_details(),
        "train": timing,
        "eval": inference,
        "flops": flops,
        "memory": {"peak_bytes": max(memory.bytes, after.bytes), "how": memory.how},
        "runtime": {"device": str(device), "threads": torch.get_num_threads(), "memory_format": "channels_last",
                    "precision": cfg.precision,
                    "allocator": "glibc, freed memory kept (mmap/trim thresholds 1 GiB)" if kept_heap else "default",
                    "autocast": cfg.precision != "fp32",
                    "grad_scaler": cfg.precision == "fp16", "tf32": tf32(device),
                    "deterministic": determinism},
        "data": {"task_names": test_set.task_names, "positive_rate_train": train_set.positive_rate(),
                 "positive_rate_val": val_set.positive_rate() if val_set is not None else None,
                 "positive_rate_test": test_set.positive_rate(),
                 "pos_weight": None if pos_weight is None else pos_weight.tolist(),
                 "num_train": len(train_set), "num_val": len(val_set) if val_set is not None else 0,
                 "num_test": len(test_set), "image_size": list(test_set.images.shape[1:]),
                 "task_groups": test_set.task_groups, "task_info": test_set.task_info,
                 "options": dataclasses.asdict(train_set.config) if hasattr(train_set, "config") else {}},
    }
