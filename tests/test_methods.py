"""Every registered method, through the one interface the engine uses."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.data import Batches
from mtlbench.engine import Trainer, build_method, execute
from mtlbench.method import Budget
from mtlbench.methods.cross_stitch import stitch_init
from mtlbench.registry import METHODS

from helpers import with_method

ALL = METHODS.names()


def test_the_five_methods_are_registered():
    assert {"tr", "hard", "separate", "cross-stitch", "stl"} <= set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_builds_and_accounts_parameters(tiny_config, name):
    model = build_method(with_method(tiny_config, name), 3)
    p = model.param_counts()
    assert p["trainable"] == sum(x.numel() for x in model.parameters())
    assert p["shared"] + p["task_specific"] == p["trainable"]


@pytest.mark.parametrize("name", ALL)
def test_one_step_changes_parameters_with_finite_loss(tiny_config, tiny_data, name):
    cfg = with_method(tiny_config, name)
    model = build_method(cfg, 3)
    train_set = tiny_data.train
    x, y = Batches(train_set.images, train_set.labels, 16, 0, train_set.mean, train_set.std).get(0)
    before = [p.detach().clone() for p in model.parameters()]
    tasks, _ = next(iter(model.schedule(Budget(1, 1), torch.Generator().manual_seed(0))))
    losses = model.train_step(x, y, tasks, Trainer(model, cfg, 1))
    assert torch.isfinite(losses).all() and len(losses) == len(tasks)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ALL)
def test_evaluation_returns_one_accuracy_per_task(tiny_config, tiny_data, name):
    result = execute(with_method(tiny_config, name), tiny_data)
    for metric in ("accuracy", "balanced_accuracy", "auroc", "ap"):
        values = result["metrics"][metric]
        assert len(values) == tiny_config.tasks and all(0 <= v <= 1 for v in values)
    assert result["train"]["batches_per_task"] == [tiny_config.steps_per_task]  # the equal budget


@pytest.mark.parametrize("name", ["tr", "hard", "stl"])
def test_same_seed_same_per_task_accuracy(tiny_config, tiny_data, name):
    cfg = with_method(tiny_config, name)
    a = execute(cfg, tiny_data)["metrics"]
    b = execute(cfg, tiny_data)["metrics"]
    assert a == b


def test_tr_at_sigma_one_equals_hard_on_the_default_backbone():
    cfg = RunConfig(tasks=40)
    tr, hard = build_method(with_method(cfg, "tr", sigma=1.0), 3), build_method(with_method(cfg, "hard"), 3)
    tr.eval(), hard.eval()
    x = torch.randn(4, 3, 32, 32)
    everything = list(range(40))
    assert torch.equal(tr(x, everything), hard.predict_all(x))  # the routed passes: bit for bit
    # the all-task path folds batch norm into the convs: equal up to float rounding
    assert tr.inference == "grouped"
    assert torch.allclose(tr.predict_all(x), hard.predict_all(x), atol=1e-5, rtol=1e-4)


def test_separate_has_no_sigma_and_matches_hard_parameter_count(tiny_config):
    from mtlbench.errors import MtlbenchError
    with pytest.raises(MtlbenchError, match="unknown option"):
        with_method(tiny_config, "separate", sigma=0.7)
    cfg = with_method(tiny_config, "separate")
    assert "sigma" not in cfg.method_options and "sigma" in with_method(tiny_config, "tr").method_options
    sep = build_method(cfg, 3)
    hard = build_method(with_method(tiny_config, "hard"), 3)
    assert sep.sigma == 0.0
    assert sep.param_counts()["trainable"] == hard.param_counts()["trainable"]
    assert all(torch.equal(r.masks.sum(dim=0), torch.ones(r.masks.shape[1])) for r in sep.routers)


@pytest.mark.parametrize("t", [1, 2, 5, 40])
def test_cross_stitch_initial_rows_sum_to_one(t):
    alpha = stitch_init(t, 6)
    assert torch.allclose(alpha.sum(dim=1), torch.ones(t, 6))
    assert (alpha.diagonal(dim1=0, dim2=1) == (0.9 if t > 1 else 1.0)).all()


@pytest.mark.parametrize("t", [2, 3, 7])
def test_cross_stitch_parameter_formula(tiny_config, t):
    model = build_method(with_method(dataclasses.replace(tiny_config, tasks=t), "cross-stitch"), 3)
    column = sum(p.numel() for p in model.columns[0].parameters())
    channels = model.columns[0].block_channels
    heads = t * (channels[-1] + 1)
    assert model.param_counts()["trainable"] == t * column + t * t * sum(channels) + heads


def test_cross_stitch_mixes_columns():
    from mtlbench.methods.cross_stitch import stitch
    alpha, xs = stitch_init(3, 2), torch.randn(3, 4, 2, 5, 5)
    looped = torch.stack([sum(alpha[i, j].view(1, -1, 1, 1) * xs[j] for j in range(3)) for i in range(3)])
    assert torch.allclose(stitch(alpha, xs), looped, atol=1e-6)


def test_stl_task_loss_leaves_other_networks_unchanged(tiny_config, tiny_data):
    cfg = with_method(dataclasses.replace(tiny_config, tasks=3), "stl")
    model = build_method(cfg, 3)
    trainer = Trainer(model, cfg, 10)
    train_set = tiny_data.train
    x, y = Batches(train_set.images, train_set.labels, 16, 0, train_set.mean, train_set.std).get(0)

    def steps(task):
        for _ in range(2):
            model.train_step(x, y, [task], trainer)

    def network(j):
        return [p.detach().clone() for m in (model.columns[j], model.heads[j]) for p in m.parameters()]

    steps(0)  # network 0 now has Adam momentum; task 1's steps must still not move it
    saved = {j: network(j) for j in (0, 2)}
    steps(1)
    for j in (0, 2):
        assert all(torch.equal(a, b) for a, b in zip(saved[j], network(j), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(network(1), network(0), strict=True))
