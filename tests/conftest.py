"""Shared fixtures: tiny settings so that every test trains in well under a second."""
from __future__ import annotations

import dataclasses

import pytest

from mtlbench.config import RunConfig
from mtlbench.engine import load_data

TINY_DATA = {"num_train": 256, "num_test": 128, "image_size": 16}
TINY_BACKBONE = {"widths": (8, 16)}
TINY_ARGS = ["--steps-per-task", "2", "--batch-size", "16", "-o", "dataset.num_train=128",
             "-o", "dataset.num_test=64", "-o", "dataset.image_size=16", "-o", "backbone.widths=8,16"]


@pytest.fixture
def tiny_config() -> RunConfig:
    return RunConfig(tasks=3, steps_per_task=2, batch_size=16, eval_batch_size=64,
                     dataset_options=dict(TINY_DATA), backbone_options=dict(TINY_BACKBONE))


@pytest.fixture
def tiny_data(tiny_config):
    return load_data(tiny_config)


def with_method(cfg: RunConfig, method: str, **changes) -> RunConfig:
    from mtlbench.registry import METHODS
    cls = METHODS.get(method)
    changes.setdefault("sigma", cfg.sigma if cls.uses_sigma else cls.fixed_sigma)
    changes.setdefault("schedule", cls.schedules[0])
    return dataclasses.replace(cfg, method=method, **changes)
