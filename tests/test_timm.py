"""Every method on timm CNNs (``--backbone timm:NAME``), with no per-model code."""
from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from torch import nn

from mtlbench.backbones import resolve_backbone
from mtlbench.cli import main
from mtlbench.config import RunConfig
from mtlbench.engine import Trainer, build_method
from mtlbench.errors import MtlbenchError
from mtlbench.layers import NORM_TYPES
from mtlbench.method import Budget
from mtlbench.registry import METHODS

from helpers import with_method

timm = pytest.importorskip("timm")

MODELS = ["resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnetx_002"]
METHOD_NAMES = ["tr", "hard", "separate", "cross-stitch", "stl"]


def config(model: str, method: str, tasks: int = 2, **options) -> RunConfig:
    cfg = RunConfig(tasks=tasks, backbone=f"timm:{model}", steps_per_task=1, batch_size=4)
    return with_method(cfg, method, **options)


def batch(channels: int = 3, size: int = 16, n: int = 4, tasks: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, channels, size, size, generator=g), torch.randint(0, 2, (n, tasks), generator=g).float()


@pytest.mark.parametrize("method", METHOD_NAMES)
@pytest.mark.parametrize("model", MODELS)
def test_every_method_builds_and_takes_a_finite_step(model, method):
    cfg = config(model, method)
    net = build_method(cfg, 3)
    x, y = batch()  # 16x16: resized up to the model's stride before the stem
    tasks, _ = next(iter(net.schedule(Budget(1, 1), torch.Generator().manual_seed(0))))
    before = [p.detach().clone() for p in net.parameters()]
    losses = net.train_step(x, y, tasks, Trainer(net, cfg, 1))
    assert torch.isfinite(losses).all() and len(losses) == len(tasks)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


@pytest.mark.parametrize("model", MODELS)
def test_tr_at_sigma_one_equals_hard_exactly(model):
    tr, hard = build_method(config(model, "tr", tasks=3, sigma=1.0), 3), build_method(config(model, "hard", tasks=3), 3)
    tr.eval(), hard.eval()
    x, _ = batch(size=32)
    assert torch.equal(tr(x, [0, 1, 2]), hard(x, [0, 1, 2]))


def _dead_gradients(net, task: int) -> list[tuple[str, int]]:
    """(layer, number of masked units with a nonzero gradient) for every routed layer."""
    out = []
    for name, routed, router in zip(net.route_names, net.routed, net.routers):
        dead = router.masks[task] == 0
        layer = routed[0]
        for p in (layer.weight, getattr(layer, "bias", None)):
            if p is not None and p.grad is not None and p.dim() >= 1 and p.shape[0] == len(dead):
                out.append((name, int(torch.count_nonzero(p.grad[dead].flatten(1) if p.dim() > 1 else p.grad[dead]))))
    return out


@pytest.mark.parametrize("model", MODELS)
def test_masked_units_get_zero_gradient(model):
    net = build_method(config(model, "tr", tasks=4, sigma=0.5), 3)
    net.train()
    x, _ = batch(size=32)
    net(x, [2]).sum().backward()
    checked = _dead_gradients(net, 2)
    assert len(checked) >= len(net.routers) // 2  # norms and convs with their own affine/weights
    assert all(n == 0 for _, n in checked), [c for c in checked if c[1]]


def _execution_counts(backbone: nn.Module, x: torch.Tensor) -> tuple[int, int]:
    """(convolutions run, conv->norm pairs), counted from a forward pass's data flow: a pair is
    a norm whose input is a conv's output tensor (or a view of it). Independent of the
    module-tree walk that places the routers."""
    conv_out, pairs, convs = {}, 0, 0
    kept = []  # keeps outputs alive, so that a storage address is never reused in the pass

    def hook(module, inputs, output):
        nonlocal pairs, convs
        kept.append(output)
        if isinstance(module, nn.Conv2d):
            convs += 1
            conv_out[output.untyped_storage().data_ptr()] = module
        elif inputs[0].untyped_storage().data_ptr() in conv_out:
            pairs += 1

    hooks = [m.register_forward_hook(hook) for m in backbone.modules() if isinstance(m, (nn.Conv2d, *NORM_TYPES))]
    with torch.no_grad():
        backbone.eval()(x)
    for h in hooks:
        h.remove()
    return convs, pairs


@pytest.mark.parametrize("model", MODELS)
def test_one_router_per_conv_and_after_the_norm_of_every_conv_norm_pair(model):
    plain = resolve_backbone(f"timm:{model}", 3).build()
    convs, pairs = _execution_counts(plain, torch.randn(1, 3, 32, 32))
    net = build_method(config(model, "tr", tasks=3), 3)
    after_norm = sum(isinstance(r[0], NORM_TYPES) for r in net.routed)
    assert (len(net.routers), after_norm) == (convs, pairs)
    assert net.describe()["routing_points"] == net.route_names and len(net.route_names) == convs


@pytest.mark.parametrize("model", MODELS)
def test_separate_shares_no_unit_and_cross_stitch_mixes_at_every_stage(model):
    sep = build_method(config(model, "separate", tasks=3), 3)
    assert all((r.masks.sum(dim=0) <= 1).all() for r in sep.routers)
    cs = build_method(config(model, "cross-stitch", tasks=2), 3)
    stages = [i["module"] for i in timm.create_model(model, num_classes=0).feature_info]
    assert len(cs.alphas) == len(cs.columns[0].blocks) == len(stages)


def test_compact_routing_is_refused_on_timm_and_auto_records_why():
    with pytest.raises(MtlbenchError, match="compact needs a plain conv-norm chain"):
        build_method(config("resnet18", "tr", impl="compact"), 3)
    net = build_method(config("resnet18", "tr", tasks=3, sigma=0.25), 3)
    net.prepare(torch.device("cpu"))
    assert net.impl == "dense" and "not a plain conv-norm chain" in net.describe()["impl_reason"]


def test_small_grey_inputs_are_resized_and_the_rule_recorded(tmp_path):
    out = tmp_path / "runs"
    code = main(["run", "--methods", "tr,cross-stitch", "--tasks", "2", "--backbone", "timm:convnext_atto",
                 "--steps-per-task", "2", "--batch-size", "8", "-o", "dataset.num_train=64", "-o",
                 "dataset.num_test=32", "-o", "dataset.image_size=12", "--val-fraction", "0", "--out", str(out)])
    assert code == 0
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert len(runs) == 2 and all(r["status"] == "ok" for r in runs)
    for r in runs:
        details = r["backbone_details"]
        assert details["timm_model"] == "convnext_atto" and "resized up to 32" in details["input_resize"]
        assert r["data"]["image_size"] == [3, 12, 12]
    tr = next(r for r in runs if r["config"]["method"] == "tr")
    assert tr["method_details"]["routing_points"][0].startswith("blocks.0.")


def test_pretrained_weights_from_a_file_load_and_renormalise(tmp_path):
    source = timm.create_model("regnetx_002", num_classes=0)
    path = tmp_path / "weights.pth"
    torch.save(source.state_dict(), path)
    spec = resolve_backbone("timm:regnetx_002", 3, {"pretrained": str(path)}, ((0.4, 0.4, 0.4), (0.2, 0.2, 0.2)))
    built = spec.build()
    stem = next(m for m in built.modules() if isinstance(m, nn.Conv2d))
    assert torch.equal(stem.weight, source.stem.conv.weight)
    norm = built.details["normalisation"]
    assert norm["model_mean"] == list(source.pretrained_cfg["mean"]) and norm["data_std"] == [0.2, 0.2, 0.2]


def test_pretrained_without_cached_weights_fails_at_once(tmp_path, monkeypatch, capsys):
    for var in ("HF_HOME", "HUGGINGFACE_HUB_CACHE", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / "empty-cache"))
    start = time.perf_counter()
    code = main(["run", "--methods", "hard", "--tasks", "2", "--backbone", "timm:resnet18", "--pretrained",
                 "--steps-per-task", "1", "--out", str(tmp_path / "out")])
    assert time.perf_counter() - start < 60  # a clear failure, not a hang on the network
    err = capsys.readouterr().err
    assert "no pretrained weights for timm:resnet18 in the local cache" in err and "--pretrained PATH" in err
    assert code != 0


@pytest.mark.parametrize("argv, message", [
    (["--backbone", "timm:resnet19"], "timm has no model 'resnet19'; did you mean"),
    (["--backbone", "timm"], "needs a model name: --backbone timm:NAME"),
    (["--backbone", "convnet:big"], "takes no model name"),
    (["--pretrained"], "--pretrained needs a timm backbone"),
    (["--backbone", "timm:resnet18", "--pretrained", "nowhere.pth"], "no such file"),
])
def test_bad_timm_input_is_one_clear_line(tmp_path, capsys, argv, message):
    code = main(["run", "--methods", "hard", "--tasks", "2", "--steps-per-task", "1", *argv, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


def test_list_backbones_explains_the_timm_prefix(capsys):
    assert main(["list", "backbones"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("backbones:") and "convnet" in out and "timm:NAME is any timm CNN" in out
    assert "methods:" not in out


def test_options_are_recorded_without_the_data_normalisation():
    spec = resolve_backbone("timm:resnet18", 1, {"min_input": 64})
    assert dataclasses.asdict(spec.config)["min_input"] == 64
    assert METHODS.get("tr")  # the registry is loaded with the timm family


def test_a_norm_that_runs_channels_last_is_routed_on_its_last_dim():
    from mtlbench.methods.tr.routing import insert_routers

    class Block(nn.Module):  # ConvNeXt's layout without conv_mlp: permute, LayerNorm, permute back
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 6, 3, padding=1), nn.LayerNorm(6)

        def forward(self, x):
            return self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    net = Block()
    routers, _, names = insert_routers(net, 2, 0.5, seed=0)
    assert names == ["norm"] and routers[0].channels_last
    routers[0].task = 1
    out = net(torch.randn(2, 3, 5, 7))
    dead = routers[0].masks[1] == 0
    assert dead.any() and torch.count_nonzero(out[:, dead]) == 0 and torch.count_nonzero(out[:, ~dead]) > 0
