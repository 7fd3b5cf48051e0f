"""Small settings and config helpers shared by the tests (imported as ``helpers``)."""
from __future__ import annotations

import dataclasses

from mtlbench.config import RunConfig
from mtlbench.registry import METHODS

TINY_DATA = {"num_train": 256, "num_test": 128, "image_size": 16}
TINY_BACKBONE = {"widths": (8, 16)}
TINY_ARGS = ["--steps-per-task", "2", "--batch-size", "16", "-o", "dataset.num_train=128",
             "-o", "dataset.num_test=64", "-o", "dataset.image_size=16", "-o", "backbone.widths=8,16"]
RUN_FIELDS = {f.name for f in dataclasses.fields(RunConfig)}


def tiny_config(**changes) -> RunConfig:
    cfg = RunConfig(tasks=3, steps_per_task=2, batch_size=16, eval_batch_size=64,
                    dataset_options=dict(TINY_DATA), backbone_options=dict(TINY_BACKBONE))
    return dataclasses.replace(cfg, **changes)


def with_method(cfg: RunConfig, method: str, **changes) -> RunConfig:
    """``cfg`` for ``method``: keywords that are run fields change the run, the others are
    method options (resolved by the method, with its defaults)."""
    run = {k: v for k, v in changes.items() if k in RUN_FIELDS}
    options = {k: v for k, v in changes.items() if k not in RUN_FIELDS}
    resolved = METHODS.get(method).resolve_options(options)
    return dataclasses.replace(cfg, method=method, method_options=resolved, **run)


class Sleeper:
    """A pool runner that writes its process id to ``cfg`` (a path) and then sleeps, as a long run."""

    def __call__(self, cfg, progress=None):
        import os
        import time
        with open(cfg, "w") as f:
            f.write(str(os.getpid()))
        time.sleep(300)
        return {"status": "ok"}
