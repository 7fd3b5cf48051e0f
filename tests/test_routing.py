"""Task routing masks and layers: the exact properties the paper's construction promises."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from mtlbench.backbones import resolve_backbone
from mtlbench.engine import build_method
from mtlbench.routing import TaskRoute, draw_masks, insert_routers, route_points

from conftest import with_method


def masks(c, t, sigma, seed=0):
    return draw_masks(c, t, sigma, torch.Generator().manual_seed(seed))


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
    routers, names = insert_routers(backbone, 3, 0.5, seed=0)
    assert len(routers) == 8  # the 8 convs of VGG-11
    assert all(n.startswith("blocks.") and n.endswith(("1", "4")) for n in names)  # the BN layers


def test_conv_without_norm_is_routed_after_the_conv():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3),
                              torch.nn.BatchNorm2d(5))
    assert [(name, c) for _, name, _, c in route_points(net)] == [("0", 4), ("3", 5)]


def test_routes_a_timm_cnn():
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet18", pretrained=False, num_classes=0)
    convs = sum(isinstance(m, torch.nn.Conv2d) for m in net.modules())
    routers, names = insert_routers(net, 5, 0.5, seed=0)
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
