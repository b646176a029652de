"""DINO: self-distillation with no labels; a student matches a momentum teacher across crops.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021
(https://arxiv.org/abs/2104.14294), Algorithm 1.

Multi-crop: 2 global views (scale 0.4-1, BYOL's asymmetric blur/solarize) and N local views
(scale 0.05-0.4, at 96/224 of the image side). The student (backbone + DINO head) sees every
crop; the teacher, an EMA of the student (momentum 0.996 -> 1, cosine), sees the global crops
only. Loss: cross-entropy between the teacher's centred, sharpened distribution
softmax((t - c) / tau_t) and the student's softmax(s / tau_s), over all pairs of different
crops. The centre c is an EMA (0.9) of the teacher's mean output over the global batch (an
all-reduce across ranks); tau_t warms up linearly from ``warmup_teacher_temp`` to
``teacher_temp`` (the paper's defaults: 0.04 and 0.04, up to 0.07 for long runs). The last head layer is
weight-normalised and may be frozen for the first steps. Teacher, centre and schedules are
part of the checkpoint.

Deviations: a fixed weight decay (the paper raises it 0.04 -> 0.4 with a cosine);
``optim.*`` warmup/cosine learning rate; schedules count optimizer steps instead of epochs;
blur scaled to the image size; the evaluated backbone is the teacher's (as in the paper).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError
from framework.losses.distillation import batch_center, dino_loss
from framework.models.vit import ViTConfig
from framework.modules.ema import cosine_momentum, ema_update, frozen_copy, linear_warmup
from framework.modules.gather import all_reduce_mean
from framework.modules.heads import DINOHead
from framework.modules.sync_batchnorm import convert_to_global_batchnorm
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "vit"


def global1() -> ViewConfig:
    return ViewConfig(scale=[0.4, 1.0], blur=1.0)


def global2() -> ViewConfig:
    return ViewConfig(scale=[0.4, 1.0], blur=0.1, solarize=0.2)


def local() -> ViewConfig:
    return ViewConfig(scale=[0.05, 0.4], blur=0.5)  # size 0: 96/224 of the image side


@dataclass
class Config(ObjectiveConfig):
    name: str = "dino"
    out_dim: int = 65536  # prototypes K
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    head_layers: int = 3
    head_batch_norm: bool = False  # the paper: no BN in the head for ViT; a ResNet's pooled post-ReLU
    # features vary little between images, and without BN the head starts in uniform collapse
    student_temp: float = 0.1
    teacher_temp: float = 0.04  # reached after the warmup; the paper goes up to 0.07 for long runs
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int = 0
    center_momentum: float = 0.9
    momentum: float = 0.996  # teacher EMA, cosine-increased to 1
    freeze_last_layer_steps: int = 0  # the paper: the first epoch
    local_crops: int = 6
    sync_batchnorm: bool = True  # only matters with BN (ResNet backbone, head_batch_norm)
    global1: ViewConfig = field(default_factory=global1)
    global2: ViewConfig = field(default_factory=global2)
    local: ViewConfig = field(default_factory=local)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


def local_size(cfg: RunConfig) -> int:
    """``objective.local.size``, or 96/224 of the image side (a multiple of the ViT patch)."""
    o, image = cfg.objective, cfg.data.image_size
    if o.local.size:
        return o.local.size
    if isinstance(cfg.model, ViTConfig):
        p = cfg.model.patch_size
        return max(p, round(image * 96 / 224 / p) * p)
    return max(1, round(image * 96 / 224))


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        o, data = self.cfg.objective, self.cfg.data
        if o.local_crops < 0:
            raise ConfigError(f"objective.local_crops must be >= 0, got {o.local_crops}")
        small = local_size(self.cfg)
        for key, size in (("global1", o.global1.size or data.image_size), ("global2", o.global2.size or data.image_size),
                          ("local", small)):
            check_patch_size(size, self.cfg, f"objective.{key}.size")
        self.backbone = build_backbone(self.cfg)
        self.head = DINOHead(self.backbone.feature_dim, o.out_dim, o.hidden_dim, o.bottleneck_dim, o.head_layers,
                             batch_norm=o.head_batch_norm)
        if o.sync_batchnorm:
            convert_to_global_batchnorm(self)
        self.teacher_backbone = frozen_copy(self.backbone)
        self.teacher_head = frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(o.out_dim))
        self.global_augments = torch.nn.ModuleList([
            ViewAugment(o.global1, data.channels, data.image_size, "objective.global1"),
            ViewAugment(o.global2, data.channels, data.image_size, "objective.global2"),
        ])
        local_view = dataclasses.replace(o.local, size=small)
        self.local_augment = ViewAugment(local_view, data.channels, data.image_size, "objective.local")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[global 1, global 2, local 1, ..., local N]."""
        crops = [augment(images) for augment in self.global_augments]
        return crops + [self.local_augment(images) for _ in range(self.cfg.objective.local_crops)]

    def teacher_temp(self) -> float:
        o = self.cfg.objective
        return linear_warmup(self.global_step, o.warmup_teacher_temp_steps, o.warmup_teacher_temp, o.teacher_temp)

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        o = self.cfg.objective
        n = views[0].shape[0]
        # One backbone pass per crop resolution (a ViT takes one sequence length at a time).
        student = list(self.head(self.backbone(torch.cat(views[:2]))).chunk(2))
        if len(views) > 2:
            student += list(self.head(self.backbone(torch.cat(views[2:]))).split(n))
        with torch.no_grad():
            teacher = list(self.teacher_head(self.teacher_backbone(torch.cat(views[:2]))).chunk(2))
        loss = dino_loss(student, teacher, self.center, o.student_temp, self.teacher_temp())
        if self.training and gather:
            self.update_center(teacher)
        return loss

    @torch.no_grad()
    def teacher_probabilities(self, batch: dict) -> torch.Tensor:
        """The teacher's centred, sharpened distribution over prototypes for whole images (the
        representation-health monitor's entropy: uniform and one-hot are DINO's two collapses)."""
        logits = self.teacher_head(self.teacher_backbone(to_float_images(val_images(batch))))
        return torch.softmax((logits - self.center) / self.teacher_temp(), dim=-1)

    @torch.no_grad()
    def update_center(self, teacher: list[torch.Tensor]) -> None:
        """c <- m c + (1 - m) mean of the teacher outputs over the global batch (Eq. 4)."""
        m = self.cfg.objective.center_momentum
        self.center.mul_(m).add_(all_reduce_mean(batch_center(teacher)), alpha=1 - m)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):
            views = self.views(to_float_images(batch))
        loss = self.loss(views)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/teacher_temp", self.teacher_temp())
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # The paper cancels the last layer's gradient during the first epoch: it stabilises the start.
        if self.global_step < self.cfg.objective.freeze_last_layer_steps:
            for param in self.head.last_layer.parameters():
                param.grad = None

    def optimizer_step(self, *args, **kwargs) -> None:
        momentum = cosine_momentum(self.global_step, self.cfg.trainer.max_steps, self.cfg.objective.momentum)
        super().optimizer_step(*args, **kwargs)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            views = self.views(to_float_images(val_images(batch)))
        self.record_val_loss(self.loss(views, gather=False), dataloader_idx)  # no centre update, no collective


    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.teacher_backbone(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.teacher_backbone  # the paper evaluates the teacher


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    datamodule = image_datamodule(cfg)  # first: fills data.image_size / data.channels the model needs
    return Objective(config_to_dict(cfg)), datamodule
