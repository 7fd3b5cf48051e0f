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
    everything = list(range(6))
    assert close(dense(x, everything), compact(x, everything))


def trained_dense(sigma: float, backbone: str = "convnet", tasks: int = 6) -> torch.nn.Module:
    """A dense tr model after a few steps (weights and running statistics away from init)."""
    dense, _ = pair(sigma, tasks=tasks, backbone=backbone)
    opt = make_optimizer(dense, RunConfig())
    dense.train()
    for t in range(tasks):
        x = torch.randn(8, 3, 16, 16)
        opt.zero_grad()
        task_loss(dense(x, [t]), torch.randint(0, 2, (8, 1))).backward()
        opt.step()
    return dense.eval()


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("mode,group", [("loop", 1), ("grouped", 1), ("grouped", 4), ("grouped", 6)])
def test_all_task_inference_equals_one_masked_pass_per_task(sigma, mode, group):
    dense = trained_dense(sigma)
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
        dense.backbone.blocks[2][1][0].running_var.add_(0.3)
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
    opts = {"widths": (8, 16)}
    tr = RunConfig(method="tr", tasks=6, sigma=1.0, backbone_options=opts)
    hard = RunConfig(method="hard", tasks=6, sigma=1.0, backbone_options=opts)
    assert method_flops(tr, (3, 16, 16))["forward_per_image_task"] == \
        method_flops(hard, (3, 16, 16))["forward_per_image_task"]


def test_inference_option_is_recorded_and_checked():
    from mtlbench.errors import MtlbenchError
    dense = trained_dense(0.5)
    assert dense.describe()["all_task_inference"] == "grouped"
    cfg = RunConfig(method="tr", tasks=3, method_options={"inference": "sideways"})
    with pytest.raises(MtlbenchError, match="inference"):
        build_method(cfg, 3)
    loop = build_method(dataclasses.replace(cfg, method_options={"inference": "loop"}), 3)
    assert loop.describe()["all_task_inference"] == "loop"


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
