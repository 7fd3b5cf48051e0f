"""Task routing masks and layers: the exact properties the paper's construction promises."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.backbones import resolve_backbone
from mtlbench.engine import build_method
from mtlbench.errors import MtlbenchError
from mtlbench.layers import insertion_points
from mtlbench.methods.tr.masks import draw_masks
from mtlbench.methods.tr.routing import TaskRoute, insert_routers

from helpers import with_method


def masks(c, t, sigma, seed=0, rule="own"):
    return draw_masks(c, t, sigma, torch.Generator().manual_seed(seed), rule=rule)


@pytest.mark.parametrize("c,t", [(32, 4), (32, 40), (7, 3), (128, 500)])
def test_sigma_one_is_all_ones(c, t):
    assert torch.equal(masks(c, t, 1.0), torch.ones(t, c))


@pytest.mark.parametrize("c,t", [(32, 4), (32, 32), (64, 10), (5, 5)])
def test_sigma_zero_is_a_partition(c, t):
    m = masks(c, t, 0.0)
    assert torch.equal(m.sum(dim=0), torch.ones(c))  # every unit kept by exactly one task
    assert (m.sum(dim=1) >= c // t).all()


@pytest.mark.parametrize("c,t", [(8, 20), (32, 100)])
def test_more_tasks_than_units_reuse_evenly(c, t):
    m = masks(c, t, 0.0)
    assert (m.sum(dim=1) == 1).all()            # every task owns exactly one unit
    per_unit = m.sum(dim=0)
    assert per_unit.min() >= 1 and per_unit.max() - per_unit.min() <= 1


@pytest.mark.parametrize("sigma", [0.0, 0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("c,t", [(32, 4), (64, 40), (16, 100)])
def test_kept_fraction_as_specified(sigma, c, t):
    owned = masks(c, t, 0.0).sum(dim=1)  # same generator stream: ownership is drawn first
    m = masks(c, t, sigma)
    expected = owned + torch.tensor([round(sigma * (c - o)) for o in owned.tolist()])
    assert torch.equal(m.sum(dim=1), expected)
    assert ((m - masks(c, t, 0.0)) >= 0).all()  # owned units are always kept
    # Kept fraction = sigma + (1 - sigma) * owned / C (+ rounding): -> sigma as tasks grow.
    assert abs(m.mean().item() - sigma) <= (1 - sigma) * owned.max().item() / c + 0.5 / c


def test_same_seed_same_masks_and_different_seed_differs():
    assert torch.equal(masks(64, 10, 0.5, seed=3), masks(64, 10, 0.5, seed=3))
    assert not torch.equal(masks(64, 10, 0.5, seed=3), masks(64, 10, 0.5, seed=4))


def test_masks_are_buffers_in_state_dict(tiny_config):
    model = build_method(with_method(tiny_config, "tr"), 3)
    keys = [k for k in model.state_dict() if k.endswith("masks")]
    assert len(keys) == len(model.routers) == 2
    assert not any(n.endswith("masks") for n, _ in model.named_parameters())


def test_insertion_points_follow_conv_norm_pairs():
    backbone = resolve_backbone("vgg11", 3).build()
    routers, _, names = insert_routers(backbone, 3, 0.5, seed=0)
    assert len(routers) == 8  # the 8 convs of VGG-11
    assert all(n.startswith("blocks.") and n.endswith(("1", "4")) for n in names)  # the BN layers


def test_conv_without_norm_is_routed_after_the_conv():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),
                              torch.nn.BatchNorm2d(5))
    assert [(name, c) for _, name, _, c in insertion_points(net)] == [("0", 4), ("3", 5)]


def test_routes_a_timm_cnn():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    routers, _, names = insert_routers(net, 5, 0.5, seed=0)
    assert len(routers) == convs
    for r in routers:
        r.task = 2
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 512)


def test_masked_units_get_exactly_zero_gradient(tiny_config):
    model = build_method(with_method(tiny_config, "tr", tasks=4), 3)
    model.train()
    model(torch.randn(8, 3, 16, 16), [2]).sum().backward()
    for block, router in zip(model.backbone.blocks, model.routers):
        conv, routed = block[0], block[1]
        dead = router.masks[2] == 0
        assert dead.any()
        assert torch.count_nonzero(conv.weight.grad[dead]) == 0
        assert torch.count_nonzero(routed[0].weight.grad[dead]) == 0  # BN scale
        assert torch.count_nonzero(routed[0].bias.grad[dead]) == 0    # BN shift
        assert (conv.weight.grad[~dead].abs().sum(dim=(1, 2, 3)) > 0).all()


def test_all_ones_mask_equals_unmasked_layer():
    route = TaskRoute(torch.ones(3, 6))
    x = torch.randn(2, 6, 4, 4)
    assert torch.equal(route(x), x)


@pytest.mark.parametrize("train_mode", [False, True])
def test_tr_at_sigma_one_equals_hard(tiny_config, train_mode):
    cfg = dataclasses.replace(tiny_config, tasks=5)
    tr = build_method(with_method(cfg, "tr", sigma=1.0), 3)
    hard = build_method(with_method(cfg, "hard"), 3)
    tr.train(train_mode)
    hard.train(train_mode)
    x = torch.randn(8, 3, 16, 16)
    tasks = list(range(5))
    assert torch.equal(tr(x, tasks), hard(x, tasks))


@pytest.mark.parametrize("sigma", [0.25, 0.5, 1.0])
@pytest.mark.parametrize("c,t", [(32, 4), (64, 40), (7, 3)])
def test_paper_masks_keep_exactly_round_sigma_c_units_per_task(sigma, c, t):
    m = masks(c, t, sigma, rule="paper")
    assert (m.sum(dim=1) == round(sigma * c)).all()
    assert torch.equal(masks(c, t, sigma, rule="paper"), m)  # seeded


def test_paper_masks_reject_sigma_zero():
    with pytest.raises(MtlbenchError, match="sigma=0 keeps none"):
        with_method(__import__("helpers").tiny_config(), "tr", sigma=0.0, masks="paper")


def _bn_layers(model):
    return [r for r in model.routed]


def test_per_task_statistics_change_only_the_active_task(tiny_config):
    model = build_method(with_method(tiny_config, "tr", tasks=4, impl="dense"), 3)
    first, *later = model.routed
    assert not first.per_task and all(r.per_task for r in later)  # the first norm reads the image
    model.train()
    before = [r.task_mean.clone() for r in later]
    model(torch.randn(16, 3, 16, 16), [2])
    for r, old in zip(later, before):
        changed = (r.task_mean != old).any(dim=1)
        assert changed.tolist() == [False, False, True, False]
        kept = r[1].masks[2] > 0  # only the units task 2 keeps
        assert torch.equal(r.task_mean[2][~kept], old[2][~kept]) and (r.task_mean[2][kept] != 0).all()
        assert r.task_batches.tolist() == [0, 0, 1, 0]


def test_eval_uses_the_active_tasks_statistics(tiny_config):
    model = build_method(with_method(tiny_config, "tr", tasks=3, impl="dense", inference="dense"), 3)
    layer = model.routed[1]
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    base = model(x, [1])
    with torch.no_grad():
        layer.task_mean[0] += 5.0  # another task's statistics: no effect on task 1
    assert torch.equal(model(x, [1]), base)
    with torch.no_grad():
        layer.task_mean[1] += 5.0
    assert not torch.equal(model(x, [1]), base)


def test_bn_stats_all_updates_every_unit_and_kept_only_the_kept_ones(tiny_config):
    x = torch.randn(16, 3, 16, 16)
    for rule, everywhere in (("all", True), ("kept", False)):
        model = build_method(with_method(tiny_config, "tr", tasks=4, bn_stats=rule, impl="dense"), 3)
        assert not any(r.per_task for r in model.routed)
        model.train()
        model(x, [1])
        bn, route = model.routed[1][0], model.routed[1][1]
        dropped = route.masks[1] == 0
        assert dropped.any()
        assert bool((bn.running_mean[dropped] != 0).all()) is everywhere
        assert (bn.running_mean[~dropped] != 0).all()


def _eval_train_gap(bn_stats: str) -> float:
    """Trained tr; per task, the mean gap between its eval-mode logits and the train-mode
    logits of one large batch (batch statistics), in units of the latter's standard
    deviation, the statistics left untouched; the largest over the tasks."""
    from mtlbench.data import Batches
    from mtlbench.engine import load_data, make_budget, train
    from helpers import tiny_config as make
    cfg = with_method(make(tasks=4, steps_per_task=60, batch_size=32, val_fraction=0.0,
                           backbone_options={"widths": (16, 32, 32)},
                           dataset_options={"num_train": 1024, "num_test": 64, "image_size": 16}),
                      "tr", sigma=0.25, impl="dense", inference="dense", bn_stats=bn_stats)
    data = load_data(cfg)
    model = build_method(cfg, 3)
    batches = Batches(data.train.images, data.train.labels, cfg.batch_size, 0, data.train.mean, data.train.std)
    train(model, batches, cfg, make_budget(cfg, len(data.train)))
    x = batches.normalise(data.train.images)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gaps = []
    with torch.no_grad():
        for t in range(4):
            model.eval()
            eval_out = model(x, [t])
            model.train()
            train_out = model(x, [t])
            model.load_state_dict(state)
            gaps.append(float((eval_out - train_out).abs().mean() / train_out.std()))
    return max(gaps)


@pytest.mark.slow
def test_after_training_eval_mode_matches_train_mode_under_per_task_statistics():
    default, shared = _eval_train_gap("task"), _eval_train_gap("kept")
    assert default < 0.2, default
    assert shared > 2 * default, (default, shared)  # what the per-task statistics fix
