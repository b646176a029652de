"""Pieces the vision objectives share: backbone from config, image data, seeded steps, probes.

Deliberately not a base class: each objective file reads top to bottom and calls these.
"""
from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Callable

import torch
from lightning.pytorch import LightningModule
from torch import nn

from framework.augment import to_float_images
from framework.config.schema import RunConfig
from framework.data.images import ImageDataModule, resolve_image_facts
from framework.errors import ConfigError
from framework.models.resnet import ResNet, ResNetConfig
from framework.models.vit import ViT, ViTConfig
from framework.modules.step_rng import seeded, step_seed
from framework.training.optim import build_optimizer

VISION_MODELS = ("vit", "resnet")


@dataclass
class ProbeConfig:
    """Online evaluation on the labelled validation shards at every validation (trainer.val_every_steps)."""

    linear: bool = True  # stop-gradient linear probe
    knn: bool = True  # weighted k-nearest-neighbour classifier (DINO's)
    knn_k: int = 20
    knn_temperature: float = 0.07
    linear_steps: int = 300  # full-batch optimisation steps of the linear probe
    linear_lr: float = 0.05
    train_fraction: float = 0.5  # of the validation samples (by a stable hash of their key) used to fit


def build_backbone(cfg: RunConfig) -> nn.Module:
    """The model section as an image backbone: (N, C, H, W) in [0, 1] -> (N, feature_dim)."""
    name = cfg.model.name
    if isinstance(cfg.model, ViTConfig):
        return ViT(cfg.model, cfg.data.channels)
    if isinstance(cfg.model, ResNetConfig):
        return ResNet(cfg.model, cfg.data.channels)
    raise ConfigError(
        f"model.name '{name}' is not an image backbone; objective '{cfg.objective.name}' needs one of: "
        f"{', '.join(VISION_MODELS)}"
    )


def require_vit(cfg: RunConfig) -> None:
    """Masked image modelling hides patches, which only a patch-token model can take."""
    if not isinstance(cfg.model, ViTConfig):
        raise ConfigError(
            f"objective '{cfg.objective.name}' masks patches and needs model.name=vit, not model.name={cfg.model.name}"
        )


def check_patch_size(size: int, cfg: RunConfig, key: str) -> None:
    if isinstance(cfg.model, ViTConfig) and size % cfg.model.patch_size:
        raise ConfigError(f"{key}={size} is not divisible by model.patch_size={cfg.model.patch_size}")


def image_datamodule(cfg: RunConfig) -> ImageDataModule:
    """Resolves ``data.image_size``/``data.channels`` (in place) and builds the DataModule."""
    resolve_image_facts(cfg.data)
    check_patch_size(cfg.data.image_size, cfg, "data.image_size")
    return ImageDataModule(cfg.data, cfg.run.seed)


def batch_rng(module: LightningModule, batch_idx: int, stage: str) -> AbstractContextManager:
    """Seed augmentations and masks of this batch by (run seed, step, batch, rank, stage).

    Validation uses a fixed seed per batch so val/loss is comparable across evaluations."""
    step = module.global_step if stage == "train" else 0
    return seeded(step_seed(module.cfg.run.seed, stage, step, batch_idx, module.global_rank), module.device)


def val_images(batch: object) -> torch.Tensor:
    """The images of a validation batch (labelled dict from the image loader) - never the labels."""
    return batch["image"] if isinstance(batch, dict) else batch


def count_flops(module: LightningModule, step: Callable[[], Any], samples: int) -> float:
    """3 x forward FLOPs per sample of ``step`` (one training step's forward on ``samples``
    samples), for the throughput callback's MFU, leaving no trace: a training step changes
    buffers (BatchNorm statistics, DINO's centre, BEiT's codebook) which a stopped-and-resumed
    run would otherwise count twice. Buffers are restored and the RNG is untouched. Every rank
    calls it (it may run collectives)."""
    from torch.utils.flop_counter import FlopCounterMode

    saved = {name: buffer.clone() for name, buffer in module.named_buffers()}
    devices = [module.device.index or 0] if module.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            counter = FlopCounterMode(display=False)
            with counter:
                step()
        return 3.0 * counter.get_total_flops() / samples
    finally:
        with torch.no_grad():
            for name, buffer in module.named_buffers():
                buffer.copy_(saved[name])


def probe_callbacks(module: LightningModule, probe: ProbeConfig) -> list:
    from framework.evaluate.probes import OnlineProbes

    if not (probe.linear or probe.knn) or not module.cfg.data.val:
        return []
    return [OnlineProbes(probe)]


class VisionObjectiveHooks:
    """The Lightning hooks every vision objective shares: FLOPs for MFU, online probes, optimizer.
    A mixin, listed before LightningModule; each method's own logic stays in its file."""

    def flops_per_sample(self, batch: torch.Tensor) -> float:
        sample = batch[:2]  # two samples: BatchNorm needs more than one value per channel
        # without the side effects a training step would have
        return count_flops(self, lambda: self.loss(self.views(to_float_images(sample))), sample.shape[0])

    def configure_callbacks(self):
        return probe_callbacks(self, self.cfg.objective.probe)

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)
