"""Compact task routing must equal the masked dense reference within float tolerance."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.method import SCHEDULES, Budget

from helpers import with_method


def pair(sigma: float, tasks: int = 6, backbone: str = "convnet", schedule: str = "sample", bn_stats: str = "task"):
    opts = {"widths": (8, 16, 16)} if backbone == "convnet" else {}
    base = RunConfig(tasks=tasks, backbone=backbone, backbone_options=opts, seed=3)
    dense = build_method(with_method(base, "tr", sigma=sigma, schedule=schedule, impl="dense", bn_stats=bn_stats), 3)
    compact = build_method(with_method(base, "tr", sigma=sigma, schedule=schedule, impl="compact",
                                       bn_stats=bn_stats), 3)
    assert dense.impl == "dense" and compact.impl == "compact"
    return dense, compact


def close(a, b):
    """Equal up to float32 rounding of sums taken in another order (relative to the scale)."""
    return bool((a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-6)


def loss(model, x, y, tasks):
    return torch.nn.functional.binary_cross_entropy_with_logits(model(x, tasks), y[:, tasks].float(),
                                                                reduction="none").mean(dim=0).sum()


@pytest.mark.parametrize("bn_stats", ["task", "kept"])
@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("schedule", ["sample", "all"])
def test_train_step_equivalence(sigma, schedule, bn_stats):
    dense, compact = pair(sigma, schedule=schedule, bn_stats=bn_stats)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 6))
    tasks = [2] if schedule == "sample" else list(range(6))
    losses = []
    for model in (dense, compact):
        model.train()
        value = loss(model, x, y, tasks)
        value.backward()
        losses.append(value)
    assert close(*losses)
    for (name, p), q in zip(dense.named_parameters(), compact.parameters(), strict=True):
        assert close(p.grad, q.grad), name
    for (name, b), c in zip(dense.named_buffers(), compact.buffers(), strict=True):
        assert close(b.float(), c.float()), name  # running statistics (and masks)


@pytest.mark.parametrize("bn_stats", ["task", "kept"])
@pytest.mark.parametrize("sigma", [0.0, 0.5])
def test_eval_outputs_equal(sigma, bn_stats):
    dense, compact = pair(sigma, bn_stats=bn_stats)
    x = torch.randn(8, 3, 16, 16)
    for model in (dense, compact):  # give the running statistics something to hold
        model.train()
        model(x, [0, 3])
        model.eval()
    everything = list(range(6))
    assert close(dense(x, everything), compact(x, everything))


def trained_dense(sigma: float, backbone: str = "convnet", tasks: int = 6, bn_stats: str = "task") -> torch.nn.Module:
    """A dense tr model after a few steps (weights and running statistics away from init)."""
    opts = {"widths": (8, 16, 16)} if backbone == "convnet" else {}
    base = RunConfig(tasks=tasks, backbone=backbone, backbone_options=opts, seed=3)
    dense = build_method(with_method(base, "tr", sigma=sigma, impl="dense", bn_stats=bn_stats), 3)
    trainer = Trainer(dense, RunConfig(), 100)
    dense.train()
    for t in range(tasks):
        x = torch.randn(8, 3, x_size(backbone), x_size(backbone))
        dense.train_step(x, torch.randint(0, 2, (8, tasks)), [t], trainer)
    return dense.eval()


def x_size(backbone: str) -> int:
    return 32 if backbone == "vgg11" else 16


@pytest.mark.parametrize("bn_stats", ["task", "kept", "all"])
@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("mode,group", [("loop", 1), ("grouped", 1), ("grouped", 4), ("grouped", 6)])
def test_all_task_inference_equals_one_masked_pass_per_task(sigma, mode, group, bn_stats):
    dense = trained_dense(sigma, bn_stats=bn_stats)
    if bn_stats == "task" and sigma < 1:
        assert any(r.per_task for r in dense.routed)  # the folding uses each task's own statistics
    x = torch.randn(5, 3, 16, 16)
    reference = dense(x, list(range(6)))  # eval mode: T masked dense passes
    out = dense.all_task(x, dense.heads.weight, dense.heads.bias, mode, group)
    assert out.shape == (5, 6) and close(out, reference)


def test_all_task_inference_on_vgg11_and_in_channels_last():
    dense = trained_dense(0.5, backbone="vgg11", tasks=3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    assert close(dense.predict_all(x), dense(x, [0, 1, 2]))


def test_all_task_inference_follows_weight_updates():
    dense = trained_dense(0.5)
    x = torch.randn(4, 3, 16, 16)
    dense.predict_all(x)  # builds the folded weights
    with torch.no_grad():
        dense.backbone.blocks[1][0].weight.mul_(1.5)
        dense.backbone.blocks[2][1].task_var.add_(0.3)
    assert close(dense.predict_all(x), dense(x, list(range(6))))


def test_all_task_inference_follows_loaded_state_and_dtype_moves():
    a, b = trained_dense(0.5), trained_dense(0.0)
    x = torch.randn(4, 3, 16, 16)
    a.predict_all(x)  # folded weights of a's state
    a.load_state_dict(b.state_dict())  # new weights, statistics and masks, copied in place
    assert close(a.predict_all(x), b.predict_all(x))
    a.double()  # parameters replaced by new tensors
    assert close(a.predict_all(x.double()).float(), b.predict_all(x))


def test_tasks_with_the_same_masks_share_one_sub_network_at_inference():
    from mtlbench.engine import method_flops
    dense = trained_dense(1.0)
    x = torch.randn(4, 3, 16, 16)
    assert close(dense.predict_all(x), dense(x, list(range(6))))
    assert dense.all_task._plan[3][0] == [0]  # one representative: every task keeps everything
    base = RunConfig(tasks=6, backbone_options={"widths": (8, 16)})
    tr, hard = with_method(base, "tr", sigma=1.0), with_method(base, "hard")
    assert method_flops(tr, (3, 16, 16))["forward_per_image_task"] == \
        method_flops(hard, (3, 16, 16))["forward_per_image_task"]


def test_inference_option_is_recorded_and_checked():
    from mtlbench.errors import MtlbenchError
    dense = trained_dense(0.5)
    assert dense.describe()["all_task_inference"] == "grouped"
    with pytest.raises(MtlbenchError, match="inference"):
        with_method(RunConfig(tasks=3), "tr", inference="sideways")
    loop = build_method(with_method(RunConfig(tasks=3), "tr", inference="loop"), 3)
    assert loop.describe()["all_task_inference"] == "loop"


def test_adam_states_stay_identical_over_a_sample_schedule():
    dense, compact = pair(0.5)
    cfg = RunConfig(lr=1e-2)
    trainers = [Trainer(m, cfg, 100) for m in (dense, compact)]
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 2, (8, 6))
    for tasks, _ in list(SCHEDULES["sample"].run(6, Budget(2, 1), torch.Generator().manual_seed(0))):
        for model, trainer in zip((dense, compact), trainers, strict=True):
            model.train_step(x, y, tasks, trainer)
    for p, q in zip(dense.parameters(), compact.parameters(), strict=True):
        assert close(p, q)
        sp, sq = trainers[0].optimizer.state[p], trainers[1].optimizer.state[q]
        assert close(sp["exp_avg"], sq["exp_avg"]) and close(sp["exp_avg_sq"], sq["exp_avg_sq"])


@pytest.mark.parametrize("bn_stats", ["task", "kept"])
def test_vgg11_compact_equals_dense(bn_stats):
    dense, compact = pair(0.5, tasks=4, backbone="vgg11", bn_stats=bn_stats)
    x = torch.randn(2, 3, 32, 32)
    dense.train(), compact.train()
    a, b = dense(x, [1]), compact(x, [1])
    assert close(a, b)
    # several tasks at once share the first layer: outputs, gradients and statistics agree
    a, b = dense(x, [3, 0, 2]), compact(x, [3, 0, 2])
    assert close(a, b)
    a.sum().backward(), b.sum().backward()
    for (name, p), q in zip(dense.named_parameters(), compact.parameters(), strict=True):
        assert close(p.grad, q.grad), name
    for (name, u), v in zip(dense.named_buffers(), compact.buffers(), strict=True):
        assert close(u.float(), v.float()), name


def test_auto_picks_compact_for_small_kept_fractions_on_cpu():
    for sigma, expected in ((0.25, "compact"), (0.5, "compact"), (0.75, "compact"), (0.95, "dense"), (1.0, "dense")):
        model = build_method(with_method(RunConfig(tasks=40), "tr", sigma=sigma), 3)
        model.prepare(torch.device("cpu"))
        assert model.impl == expected and model.describe()["impl"] == expected
    model = build_method(with_method(RunConfig(tasks=40), "tr", sigma=0.25, bn_stats="all"), 3)
    model.prepare(torch.device("cpu"))
    assert model.impl == "dense"  # compact never computes the dropped units whose statistics "all" updates


def test_compact_needs_a_plain_chain():
    from mtlbench.errors import MtlbenchError
    from mtlbench.methods.tr.compact import chain
    from mtlbench.methods.tr.routing import insert_routers
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    insert_routers(net, 2, 0.5, 0)
    assert chain(net) is None
    with pytest.raises(MtlbenchError, match="--tr-impl must be one of"):
        with_method(RunConfig(tasks=2), "tr", impl="fast")
