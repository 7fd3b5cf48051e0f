"""Backbones: the one network definition every method builds on.

A backbone maps images to a feature vector. It is a sequence of blocks (so cross-stitch can
mix columns after each block) followed by global average pooling. Methods never carry their
own copy of the network: they call :meth:`BackboneSpec.build` once per column they need.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from mtlbench.errors import MtlbenchError
from mtlbench.registry import BACKBONES, register_backbone


class Backbone(nn.Module):
    """``blocks`` (an ``nn.Sequential`` of conv blocks), then global average pooling."""

    def __init__(self, blocks: list[nn.Module], block_channels: list[int]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.block_channels = list(block_channels)
        self.num_features = block_channels[-1]
        self.details: dict = {}  # facts worth recording in a result (a timm model's stages, say)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.blocks(x))


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@dataclass
class ConvNetConfig:
    widths: tuple[int, ...] = (32, 64, 128, 128)
    in_channels: int = 3


@register_backbone("convnet", "Small CNN: 4 conv3x3-BN-ReLU blocks (32-64-128-128), max-pool, GAP (default).")
def convnet(cfg: ConvNetConfig) -> Backbone:
    if not cfg.widths or min(cfg.widths) < 1:
        raise MtlbenchError(f"backbone convnet: widths must be positive channel counts, got {cfg.widths}")
    blocks, cin = [], cfg.in_channels
    for i, w in enumerate(cfg.widths):
        layers = conv_bn_relu(cin, w)
        if i < len(cfg.widths) - 1:
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
        blocks.append(nn.Sequential(*layers))
        cin = w
    return Backbone(blocks, list(cfg.widths))


convnet.config_class = ConvNetConfig


@dataclass
class VGG11Config:
    # The 8-conv VGG-11 layout (configuration "A") used by the Task Routing release.
    stages: tuple[tuple[int, ...], ...] = ((64,), (128,), (256, 256), (512, 512), (512, 512))
    in_channels: int = 3


@register_backbone("vgg11", "VGG-11 with batch norm: 8 conv layers in 5 stages (64-128-256x2-512x2-512x2), GAP.")
def vgg11(cfg: VGG11Config) -> Backbone:
    blocks, cin = [], cfg.in_channels
    for stage in cfg.stages:
        layers: list[nn.Module] = []
        for w in stage:
            layers += conv_bn_relu(cin, w)
            cin = w
        layers.append(nn.MaxPool2d(2, ceil_mode=True))  # ceil_mode keeps 28x28 inputs valid
        blocks.append(nn.Sequential(*layers))
    return Backbone(blocks, [s[-1] for s in cfg.stages])


vgg11.config_class = VGG11Config


@dataclass
class BackboneSpec:
    """What a method needs to build columns: the registered name and its resolved config."""

    name: str
    config: object = field(default=None)

    def build(self) -> Backbone:
        builder, model = backbone_builder(self.name)
        return builder(self.config, model) if model else builder(self.config)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self.config)}


def backbone_builder(name: str):
    """``(builder, model name)`` for ``name``: a registered backbone (``convnet``), or a family
    and one of its models (``timm:resnet18``); the model name is "" for a plain backbone."""
    family, sep, model = name.partition(":")
    builder = BACKBONES.get(family)
    takes_model = getattr(builder, "takes_model", False)
    if sep and not takes_model:
        raise MtlbenchError(f"backbone {family!r} takes no model name (got {name!r})")
    if takes_model and not model:
        raise MtlbenchError(f"backbone {family!r} needs a model name: --backbone {family}:NAME")
    return builder, model


def resolve_backbone(name: str, in_channels: int, options: dict | None = None,
                     data_norm: tuple | None = None) -> BackboneSpec:
    """Look up ``name`` and build its config from defaults, ``in_channels`` (and, for a backbone
    that takes them, the dataset's normalisation ``data_norm = (mean, std)``) and user options."""
    builder, _ = backbone_builder(name)
    from mtlbench.config import make_config

    given = {"in_channels": in_channels, **(options or {})}
    fields = {f.name for f in dataclasses.fields(builder.config_class)}
    if data_norm and "data_mean" in fields:
        given.update(data_mean=tuple(data_norm[0])[:in_channels], data_std=tuple(data_norm[1])[:in_channels])
    cfg = make_config(builder.config_class, given, what=f"backbone {name!r}")
    return BackboneSpec(name, cfg)


# Backbone families defined in their own modules register when the built-ins load.
from mtlbench import timm_backbone  # noqa: E402,F401
