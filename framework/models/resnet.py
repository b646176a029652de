"""ResNet (He et al., "Deep Residual Learning for Image Recognition", CVPR 2016).

Images (N, C, H, W) in [0, 1] -> globally average-pooled features (N, feature_dim).
``stem: imagenet`` is the 7x7 stride-2 convolution + max-pool; ``stem: cifar`` is one 3x3
stride-1 convolution without pooling, the usual choice for 32 px (and smaller) images,
where the ImageNet stem would shrink the image 4x before the first block.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import nn

from framework.config.schema import ModelConfig
from framework.errors import ConfigError


@dataclass
class ResNetConfig(ModelConfig):
    name: str = "resnet"
    block: str = "basic"  # basic (ResNet-18/34) | bottleneck (ResNet-50+)
    layers: List[int] = field(default_factory=lambda: [2, 2, 2, 2])  # blocks per stage
    widths: List[int] = field(default_factory=lambda: [64, 128, 256, 512])  # channels per stage (before expansion)
    stem: str = "imagenet"  # imagenet | cifar
    zero_init_residual: bool = True  # last BN of each block starts at 0: blocks start as identities
    # Input normalisation inside the model, so users feed plain [0, 1] images.
    mean: float = 0.5
    std: float = 0.25


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int) -> None:
        super().__init__()
        out = width * self.expansion
        self.conv1 = nn.Conv2d(in_ch, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)  # stride on the 3x3 (ResNet v1.5)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(in_ch, out, stride)

    def last_bn(self) -> nn.BatchNorm2d:
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_ch: int, out_ch: int, stride: int) -> nn.Module:
    if stride == 1 and in_ch == out_ch:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))


class ResNet(nn.Module):
    repeated_blocks = (BasicBlock, Bottleneck)

    def __init__(self, cfg: ResNetConfig, channels: int) -> None:
        super().__init__()
        blocks = {"basic": BasicBlock, "bottleneck": Bottleneck}
        if cfg.block not in blocks:
            raise ConfigError(f"model.block must be 'basic' or 'bottleneck', not {cfg.block!r}")
        if cfg.stem not in ("imagenet", "cifar"):
            raise ConfigError(f"model.stem must be 'imagenet' or 'cifar', not {cfg.stem!r}")
        if not cfg.layers or len(cfg.layers) != len(cfg.widths) or min(cfg.layers) < 1 or min(cfg.widths) < 1:
            raise ConfigError(
                "model.layers and model.widths must be equally long lists of positive numbers, "
                f"got {list(cfg.layers)} and {list(cfg.widths)}"
            )
        block = blocks[cfg.block]
        self.cfg, self.channels = cfg, channels
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std), persistent=False)
        stem_width = cfg.widths[0]
        if cfg.stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(channels, stem_width, 7, 2, 3, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
                nn.MaxPool2d(3, 2, 1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(channels, stem_width, 3, 1, 1, bias=False), nn.BatchNorm2d(stem_width), nn.ReLU(inplace=True),
            )
        stages, in_ch = [], stem_width
        for index, (count, width) in enumerate(zip(cfg.layers, cfg.widths)):
            stride = 1 if index == 0 else 2
            stage = []
            for i in range(count):
                stage.append(block(in_ch, width, stride if i == 0 else 1))
                in_ch = width * block.expansion
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.feature_dim = in_ch
        self.feature_map_dim = in_ch  # channels of feature_map()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        if cfg.zero_init_residual:
            for module in self.modules():
                if isinstance(module, (BasicBlock, Bottleneck)):
                    nn.init.zeros_(module.last_bn().weight)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the last stage's (N, feature_dim, h, w), before pooling."""
        if images.shape[1] != self.channels:
            raise ValueError(f"the model expects {self.channels}-channel images, got shape {tuple(images.shape)}")
        x = (images - self.pixel_mean) / self.pixel_std
        return self.stages(self.stem(x))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(images)).flatten(1)
