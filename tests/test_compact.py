"""Compact task routing must equal the masked dense reference within float tolerance."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import build_method, make_optimizer, task_loss
from mtlbench.method import sample_schedule

TOL = dict(rtol=1e-4, atol=1e-5)


def pair(sigma: float, tasks: int = 6, backbone: str = "convnet", schedule: str = "sample"):
    opts = {"widths": (8, 16, 16)} if backbone == "convnet" else {}
    base = RunConfig(method="tr", tasks=tasks, sigma=sigma, schedule=schedule, backbone=backbone,
                     backbone_options=opts, seed=3)
    dense = build_method(dataclasses.replace(base, tr_impl="dense"), 3)
    compact = build_method(dataclasses.replace(base, tr_impl="compact"), 3)
    assert dense.impl == "dense" and compact.impl == "compact"
    return dense, compact


def close(a, b):
    return torch.allclose(a, b, **TOL)


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("schedule", ["sample", "all"])
def test_train_step_equivalence(sigma, schedule):
    dense, compact = pair(sigma, schedule=schedule)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 6))
    tasks = [2] if schedule == "sample" else list(range(6))
    losses = []
    for model in (dense, compact):
        model.train()
        loss = task_loss(model(x, tasks), y[:, tasks])
        loss.backward()
        losses.append(loss)
    assert close(*losses)
    for (name, p), q in zip(dense.named_parameters(), compact.parameters(), strict=True):
        assert close(p.grad, q.grad), name
    for (name, b), c in zip(dense.named_buffers(), compact.buffers(), strict=True):
        assert close(b.float(), c.float()), name  # running statistics (and masks)


@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_eval_outputs_equal(sigma):
    dense, compact = pair(sigma)
    x = torch.randn(8, 3, 16, 16)
    for model in (dense, compact):  # give the running statistics something to hold
        model.train()
        model(x, [0, 3])
        model.eval()
    assert close(dense.predict_all(x), compact.predict_all(x))


def test_adam_states_stay_identical_over_a_sample_schedule():
    dense, compact = pair(0.5)
    cfg = RunConfig(lr=1e-2)
    opts = [make_optimizer(m, cfg) for m in (dense, compact)]
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 6))
    for tasks in list(sample_schedule(6, 2, torch.Generator().manual_seed(0))):
        for model, opt in zip((dense, compact), opts, strict=True):
            opt.zero_grad(set_to_none=True)
            task_loss(model(x, tasks), y[:, tasks]).backward()
            opt.step()
    for p, q in zip(dense.parameters(), compact.parameters(), strict=True):
        assert close(p, q)
        sp, sq = opts[0].state[p], opts[1].state[q]
        assert close(sp["exp_avg"], sq["exp_avg"]) and close(sp["exp_avg_sq"], sq["exp_avg_sq"])


def test_vgg11_compact_equals_dense():
    dense, compact = pair(0.5, tasks=4, backbone="vgg11")
    x = torch.randn(2, 3, 32, 32)
    dense.train(), compact.train()
    a, b = dense(x, [1]), compact(x, [1])
    assert close(a, b)


def test_auto_picks_compact_for_small_kept_fractions_on_cpu():
    for sigma, expected in ((0.25, "compact"), (0.5, "compact"), (1.0, "dense")):
        model = build_method(RunConfig(method="tr", tasks=40, sigma=sigma, schedule="sample"), 3)
        model.prepare(torch.device("cpu"))
        assert model.impl == expected and model.describe()["impl"] == expected


def test_compact_needs_a_plain_chain():
    from mtlbench.errors import MtlbenchError
    from mtlbench.compact import chain
    from mtlbench.routing import insert_routers
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    insert_routers(net, 2, 0.5, 0)
    assert chain(net) is None
    with pytest.raises(MtlbenchError, match="--tr-impl must be one of"):
        build_method(RunConfig(method="tr", tasks=2, schedule="sample", tr_impl="fast"), 3)
