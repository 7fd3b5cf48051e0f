"""The built-in synthetic dataset: deterministic, balanced, learnable, relatedness works."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.datasets.synthetic import MAX_TASKS, Synthetic, SyntheticConfig
from mtlbench.engine import execute
from mtlbench.errors import MtlbenchError

from helpers import with_method

SMALL = SyntheticConfig(num_train=400, num_test=300, image_size=16)


def test_same_seed_same_images_and_labels():
    a, b = Synthetic(split="train", num_tasks=20, config=SMALL), Synthetic(split="train", num_tasks=20, config=SMALL)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    c = Synthetic(split="train", num_tasks=20, config=dataclasses.replace(SMALL, data_seed=1))
    assert not torch.equal(a.images, c.images)


def test_splits_differ_and_have_the_requested_sizes():
    train, test = (Synthetic(split=s, num_tasks=5, config=SMALL) for s in ("train", "test"))
    assert train.images.shape == (400, 3, 16, 16) and test.images.shape == (300, 3, 16, 16)
    assert train.images.dtype == torch.uint8 and test.labels.shape == (300, 5)
    assert not torch.equal(train.images[:300], test.images)


def test_thousands_of_roughly_balanced_tasks():
    data = Synthetic(split="train", num_tasks=MAX_TASKS, config=dataclasses.replace(SMALL, num_train=4000))
    assert MAX_TASKS >= 1000 and data.num_tasks == MAX_TASKS
    rate = data.labels.float().mean(dim=0)
    assert 0.40 < rate.min() and rate.max() < 0.60


def test_first_tasks_do_not_depend_on_how_many_are_asked_for():
    few = Synthetic(split="test", num_tasks=5, config=SMALL)
    many = Synthetic(split="test", num_tasks=50, config=SMALL)
    assert torch.equal(few.labels, many.labels[:, :5])


def mean_abs_label_correlation(relatedness: float) -> float:
    cfg = dataclasses.replace(SMALL, relatedness=relatedness, num_test=2000)
    labels = Synthetic(split="test", num_tasks=30, config=cfg).labels.float()
    corr = torch.corrcoef(labels.t()).abs()
    return ((corr.sum() - 30) / (30 * 29)).item()


def test_relatedness_controls_label_correlation():
    c0, c5, c1 = (mean_abs_label_correlation(r) for r in (0.0, 0.5, 1.0))
    assert c0 < c5 < c1
    assert c1 > 0.99 and c0 < 0.3


def test_bad_options_and_splits_are_clear_errors():
    with pytest.raises(MtlbenchError, match="valid splits: train, test"):
        Synthetic(split="val", num_tasks=3)
    with pytest.raises(MtlbenchError, match="1 to 4096 tasks"):
        Synthetic(split="train", num_tasks=MAX_TASKS + 1)
    with pytest.raises(MtlbenchError, match="relatedness"):
        Synthetic(split="train", num_tasks=3, config=dataclasses.replace(SMALL, relatedness=2.0))


def test_tasks_are_learnable_hard_beats_chance(tiny_config):
    cfg = dataclasses.replace(tiny_config, tasks=5, steps_per_task=80, batch_size=32, lr=3e-3,
                              dataset_options={"num_train": 2560, "num_test": 500}, backbone_options={})
    cfg = with_method(cfg, "hard")
    from mtlbench.engine import load_data
    metrics = execute(cfg, load_data(cfg))["metrics"]
    assert metrics["mean_balanced_accuracy"] > 0.70, metrics  # chance is 0.5
