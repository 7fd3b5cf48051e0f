"""The grouped form of many columns (stl, cross-stitch) must equal the loop form."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.errors import MtlbenchError
from mtlbench.methods.columns import AUTO_COLUMNS

from helpers import with_method

TOL = dict(rtol=1e-4, atol=1e-5)


def pair(method: str, tasks: int = 4, backbone: str = "convnet"):
    opts = {"widths": (8, 16, 16)} if backbone == "convnet" else {}
    base = RunConfig(tasks=tasks, backbone=backbone, backbone_options=opts, seed=5)
    loop = build_method(with_method(base, method, columns="loop"), 3)
    grouped = build_method(with_method(base, method, columns="grouped"), 3)
    assert (loop.column_impl, grouped.column_impl) == ("loop", "grouped")
    return loop, grouped


@pytest.mark.parametrize("method", ["cross-stitch", "stl"])
def test_grouped_training_step_equals_the_loop(method):
    loop, grouped = pair(method)
    # SGD: Adam's normalised step would blow float rounding on near-zero gradients up to lr
    cfg = RunConfig(optimizer="sgd", lr=0.05, lr_schedule="constant")
    trainers = [Trainer(m, cfg, 10) for m in (loop, grouped)]
    everything = list(range(4))
    for step in range(3):  # several steps: weights, optimiser states and running statistics move
        x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 4))
        losses = []
        for model, trainer in zip((loop, grouped), trainers, strict=True):
            model.train()
            losses.append(model.train_step(x, y, everything, trainer))
            if step == 0:  # gradients stay until the next step clears them
                model.first_grads = [p.grad.clone() for p in model.parameters()]
        assert torch.allclose(*losses, **TOL)
    for g, h in zip(loop.first_grads, grouped.first_grads, strict=True):
        assert torch.allclose(g, h, **TOL)
    for (name, p), q in zip(loop.named_parameters(), grouped.parameters(), strict=True):
        assert torch.allclose(p, q, **TOL), name
    for (name, b), c in zip(loop.named_buffers(), grouped.buffers(), strict=True):
        assert torch.allclose(b.float(), c.float(), **TOL), name  # running statistics, batch counts


@pytest.mark.parametrize("method", ["cross-stitch", "stl"])
def test_grouped_eval_equals_the_loop_in_channels_last(method):
    loop, grouped = pair(method, tasks=3, backbone="vgg11")
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    for model in (loop, grouped):
        model.to(memory_format=torch.channels_last)
        model.train()
        model(x, [0, 1, 2])  # running statistics away from their initial values
        model.eval()
    with torch.no_grad():
        assert torch.allclose(loop.predict_all(x), grouped.predict_all(x), **TOL)


def test_stl_grouped_step_on_one_task_leaves_other_columns_alone():
    _, grouped = pair("stl")
    before = [p.clone() for p in grouped.columns[1].parameters()]
    grouped.train_step(torch.randn(8, 3, 16, 16), torch.ones(8, 4), [0], Trainer(grouped, RunConfig(), 10))
    assert all(torch.equal(a, b) for a, b in zip(before, grouped.columns[1].parameters(), strict=True))


def test_column_choice_is_by_device_and_recorded():
    loop, _ = pair("cross-stitch")
    model = build_method(with_method(RunConfig(tasks=2), "cross-stitch"), 3)
    model.prepare(torch.device("cpu"))
    assert model.column_impl == AUTO_COLUMNS["cpu"]
    assert model.describe()["column_impl"] == AUTO_COLUMNS["cpu"]
    model.prepare(torch.device("meta"))  # an unlisted device type falls back to the loop
    assert model.column_impl == "loop"
    with pytest.raises(MtlbenchError, match="columns must be one of"):
        with_method(RunConfig(tasks=2), "stl", columns="vmap")


@pytest.mark.parametrize("budget_columns", [1, 3, 4])
def test_stl_grouped_inference_in_parts_equals_the_loop(monkeypatch, budget_columns):
    from mtlbench import layers
    loop, grouped = pair("stl")
    x = torch.randn(5, 3, 16, 16)
    per_column = 5 * grouped.grouped.activation_elements(x) * x.element_size()
    monkeypatch.setitem(layers.GROUP_BYTES, "cpu", per_column * budget_columns)
    calls = []
    monkeypatch.setattr(type(grouped), "_grouped_part",
                        lambda self, x, i, j, real=type(grouped)._grouped_part: calls.append((i, j)) or real(self, x, i, j))
    for model in (loop, grouped):
        model.train()
        model(x, [0, 1, 2, 3])
        model.eval()
    calls.clear()
    with torch.no_grad():
        assert torch.allclose(loop.predict_all(x), grouped.predict_all(x), **TOL)
    assert calls == [(i, min(i + budget_columns, 4)) for i in range(0, 4, budget_columns)]
