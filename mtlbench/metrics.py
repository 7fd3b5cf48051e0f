"""Per-task binary metrics: accuracy and balanced accuracy at threshold 0, and the
threshold-free AUROC and average precision.

Every metric is computed per task on ``logits [N, T]`` and ``labels [N, T]``; a task whose
labels hold one class only gets NaN for AUROC and AP (they are undefined there) and the
recall of the class present for balanced accuracy.
"""
from __future__ import annotations

import math

import numpy as np
import torch

METRICS = ("accuracy", "balanced_accuracy", "auroc", "ap")


def binary_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, list[float]]:
    """Per-task lists of every metric in :data:`METRICS`."""
    logits, labels = logits.float().cpu(), labels.cpu()
    pred, y = logits > 0, labels.bool()
    acc = (pred == y).float().mean(dim=0)
    pos, neg = y.sum(dim=0), (~y).sum(dim=0)
    tpr = (pred & y).sum(dim=0) / pos.clamp(min=1)
    tnr = (~pred & ~y).sum(dim=0) / neg.clamp(min=1)
    present = (pos > 0).float() + (neg > 0).float()
    bacc = (tpr * (pos > 0) + tnr * (neg > 0)) / present
    return {"accuracy": acc.tolist(), "balanced_accuracy": bacc.tolist(),
            "auroc": [auroc(logits[:, t], y[:, t]) for t in range(y.shape[1])],
            "ap": [average_precision(logits[:, t], y[:, t]) for t in range(y.shape[1])]}


def means(per_task: dict[str, list[float]]) -> dict[str, float]:
    """``mean_<metric>`` over the tasks where the metric is defined (NaN if none)."""
    out = {}
    for name, values in per_task.items():
        v = np.asarray(values, dtype=float)
        out[f"mean_{name}"] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
    return out


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney U statistic with average ranks)."""
    n_pos, n = int(positive.sum()), len(positive)
    n_neg = n - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(scores.double())
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """Average precision: the mean, over the positives, of the precision at the threshold that
    first includes each (tied scores enter together), as scikit-learn defines it."""
    n_pos = int(positive.sum())
    if n_pos == 0 or n_pos == len(positive):
        return math.nan
    order = torch.argsort(scores.double(), descending=True, stable=True)
    s, y = scores.double()[order], positive[order].double()
    tp, seen = torch.cumsum(y, 0), torch.arange(1, len(y) + 1, dtype=torch.float64)
    last = torch.ones(len(s), dtype=torch.bool)  # the last position of each run of tied scores
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    recall_step = torch.diff(tp, prepend=torch.zeros(1, dtype=torch.float64)) / n_pos
    return float((recall_step * tp / seen).sum())


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks of ``x``, tied values sharing the mean of their ranks."""
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    starts = torch.ones(len(x), dtype=torch.bool)
    starts[1:] = sorted_x[1:] != sorted_x[:-1]
    group = torch.cumsum(starts, 0) - 1
    positions = torch.arange(1, len(x) + 1, dtype=torch.float64)
    sums = torch.zeros(int(group[-1]) + 1, dtype=torch.float64).index_add_(0, group, positions)
    counts = torch.zeros_like(sums).index_add_(0, group, torch.ones_like(positions))
    ranks = torch.empty(len(x), dtype=torch.float64)
    ranks[order] = (sums / counts)[group]
    return ranks
