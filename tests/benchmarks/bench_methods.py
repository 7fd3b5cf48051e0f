"""pytest-benchmark suite: one training step and one all-task inference pass per method.

Every step goes through the method's own ``train_step`` (as ``mtlbench run`` and ``mtlbench
bench`` do). Not part of the default test run (the file name does not match ``test_*.py``).
Run it with

    python -m pytest tests/benchmarks/bench_methods.py --benchmark-autosave

and fail on a slowdown against the saved baseline with

    python -m pytest tests/benchmarks/bench_methods.py --benchmark-compare --benchmark-compare-fail=median:10%
"""
from __future__ import annotations

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.measure import tune_allocator
from mtlbench.method import Budget
from mtlbench.registry import METHODS

BATCH = 64


def setup(method: str, tasks: int):
    cfg = RunConfig(method=method, tasks=tasks, method_options=METHODS.get(method).resolve_options({}))
    tune_allocator()  # as mtlbench run does
    model = build_method(cfg, 3).to(memory_format=torch.channels_last)
    model.prepare(torch.device("cpu"))  # resolve the auto choices (tr impl, columns) as a run does
    x = torch.randn(BATCH, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (BATCH, tasks))
    return cfg, model, x, y


@pytest.mark.parametrize("tasks", [2, 40, 200])
@pytest.mark.parametrize("method", METHODS.names())
def test_train_step(benchmark, method, tasks):
    cfg, model, x, y = setup(method, tasks)
    trainer = Trainer(model, cfg, 100)
    step_tasks, _ = next(iter(model.schedule(Budget(1, 1), torch.Generator().manual_seed(0))))

    def step():
        model.train_step(x, y, step_tasks, trainer)

    benchmark.extra_info["pairs_per_step"] = BATCH * len(step_tasks)
    benchmark.pedantic(step, rounds=3, warmup_rounds=1)


@pytest.mark.parametrize("tasks", [2, 40, 200])
@pytest.mark.parametrize("method", METHODS.names())
def test_all_task_inference(benchmark, method, tasks):
    _, model, x, _ = setup(method, tasks)
    model.eval()

    def infer():
        with torch.no_grad():
            return model.predict_all(x)

    benchmark.extra_info["images"] = BATCH
    benchmark.pedantic(infer, rounds=3, warmup_rounds=1)
