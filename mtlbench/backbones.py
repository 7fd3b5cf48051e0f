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
        return BACKBONES.get(self.name)(self.config)

    def to_dict(self) -> dict:
        return {"name": self.name, "config": dataclasses.asdict(self.config)}


def resolve_backbone(name: str, in_channels: int, options: dict | None = None) -> BackboneSpec:
    """Look up ``name`` and build its config from defaults, ``in_channels`` and user options."""
    builder = BACKBONES.get(name)
    from mtlbench.config import make_config

    cfg = make_config(builder.config_class, {"in_channels": in_channels, **(options or {})},
                      what=f"backbone {name!r}")
    return BackboneSpec(name, cfg)
