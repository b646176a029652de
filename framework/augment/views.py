"""One augmented view of a batch: random rotation/shear, resized crop, flip, colour jitter, grayscale,
blur, solarize.

Runs batched on whatever device the images are on (each sample draws its own parameters),
so the data loader only decodes. Each objective declares its views as ``ViewConfig``s with
its paper's defaults; multi-crop is several views with different sizes and scales.
Images are floats in [0, 1] with 1 or 3 channels; with 1 channel, the colour-only operations
(saturation, hue, grayscale) are skipped since they are meaningless there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import kornia.augmentation as K
import torch
from torch import nn

from framework.errors import ConfigError


@dataclass
class ViewConfig:
    size: int = 0  # output side in pixels; 0 = data.image_size
    scale: List[float] = field(default_factory=lambda: [0.08, 1.0])  # crop area, fraction of the image
    ratio: List[float] = field(default_factory=lambda: [3 / 4, 4 / 3])  # crop aspect ratio range
    # Off in the papers' natural-image recipes; the variation of handwriting (digits, characters):
    rotate: float = 0.0  # degrees: each image is rotated by a uniform angle in [-rotate, rotate]
    shear: float = 0.0  # degrees: and sheared along x by a uniform angle in [-shear, shear]
    hflip: float = 0.5  # probability of a horizontal flip
    jitter: float = 0.8  # probability of colour jitter with the strengths below
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2  # probability
    blur: float = 0.0  # probability of a Gaussian blur
    blur_sigma: List[float] = field(default_factory=lambda: [0.1, 2.0])  # in pixels at 224 px, scaled to size
    solarize: float = 0.0  # probability


def to_float_images(batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) from the loader -> float32 in [0, 1] (floats pass through)."""
    return batch.float().div_(255.0) if batch.dtype == torch.uint8 else batch.float()


def _check(cfg: ViewConfig, where: str) -> None:
    for key in ("hflip", "jitter", "grayscale", "blur", "solarize"):
        value = getattr(cfg, key)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{where}.{key} is a probability in [0, 1], got {value}")
    for key in ("scale", "ratio", "blur_sigma"):
        pair = list(getattr(cfg, key))
        if len(pair) != 2 or not 0 < pair[0] <= pair[1]:
            raise ConfigError(f"{where}.{key} must be [low, high] with 0 < low <= high, got {pair}")
    if cfg.scale[1] > 1.0:
        raise ConfigError(f"{where}.scale: a crop cannot exceed the image (high <= 1), got {list(cfg.scale)}")
    for key in ("rotate", "shear"):
        if not 0.0 <= getattr(cfg, key) < 90.0:
            raise ConfigError(f"{where}.{key} is a maximum angle in degrees in [0, 90), got {getattr(cfg, key)}")
    if cfg.size < 0:
        raise ConfigError(f"{where}.size must be >= 0 (0 = data.image_size), got {cfg.size}")


class ViewAugment(nn.Module):
    """(N, C, H, W) floats in [0, 1] -> (N, C, size, size) floats in [0, 1]."""

    def __init__(self, cfg: ViewConfig, channels: int, image_size: int, where: str = "objective.view") -> None:
        super().__init__()
        _check(cfg, where)
        if channels not in (1, 3):
            raise ConfigError(f"data.channels must be 1 or 3, got {channels}")
        self.size = cfg.size or image_size
        color = channels == 3
        ops: list[nn.Module] = []
        if cfg.rotate > 0 or cfg.shear > 0:
            # before the crop, at the input's resolution; corners rotated in are black (0)
            ops.append(K.RandomAffine(degrees=cfg.rotate, shear=(-cfg.shear, cfg.shear) if cfg.shear else None, p=1.0))
        ops.append(K.RandomResizedCrop((self.size, self.size), scale=tuple(cfg.scale), ratio=tuple(cfg.ratio)))
        if cfg.hflip > 0:
            ops.append(K.RandomHorizontalFlip(p=cfg.hflip))
        if cfg.jitter > 0:
            ops.append(K.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation if color else 0.0,
                                     cfg.hue if color else 0.0, p=cfg.jitter))
        if cfg.grayscale > 0 and color:
            ops.append(K.RandomGrayscale(p=cfg.grayscale))
        if cfg.blur > 0:
            # Papers blur with a kernel of ~10% of a 224 px image and sigma in [0.1, 2.0] px; scale both
            # to this view's size so small images are not wiped out.
            scale = self.size / 224
            kernel = max(3, int(0.1 * self.size) // 2 * 2 + 1)
            sigma = (max(cfg.blur_sigma[0] * scale, 1e-3), max(cfg.blur_sigma[1] * scale, 1e-3))
            ops.append(K.RandomGaussianBlur((kernel, kernel), sigma, p=cfg.blur))
        if cfg.solarize > 0:
            ops.append(K.RandomSolarize(thresholds=0.0, additions=0.0, p=cfg.solarize))  # invert above 0.5
        self.ops = nn.Sequential(*ops)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.ops(images).clamp_(0.0, 1.0)
