"""pytest-benchmark suite: one training step and one all-task inference pass per method.

Not part of the default test run (the file name does not match ``test_*.py``). Run it with

    python -m pytest tests/benchmarks/bench_methods.py --benchmark-autosave

and fail on a slowdown against the saved baseline with

    python -m pytest tests/benchmarks/bench_methods.py --benchmark-compare --benchmark-compare-fail=median:10%
"""
from __future__ import annotations

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import build_method, make_optimizer, task_loss
from mtlbench.measure import tune_allocator
from mtlbench.registry import METHODS

BATCH = 64


def setup(method: str, tasks: int):
    cls = METHODS.get(method)
    cfg = RunConfig(method=method, tasks=tasks, sigma=0.5 if cls.uses_sigma else cls.fixed_sigma,
                    schedule=cls.schedules[0])
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
    opt = make_optimizer(model, cfg)
    step_tasks = next(iter(model.schedule(1, torch.Generator().manual_seed(0))))

    def step():
        opt.zero_grad(set_to_none=True)
        task_loss(model(x, step_tasks), y[:, step_tasks]).backward()
        opt.step()

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
