"""BYOL: an online network predicts a slowly moving target network's projection of another view.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning",
NeurIPS 2020 (https://arxiv.org/abs/2006.07733).

Two views v, v' (the paper's asymmetric augmentations, Table 6). The online network
(backbone, projector, predictor) maps v to a prediction p; the target network (an EMA of
backbone and projector, no predictor) maps v' to z'. Loss = 2 - 2 cos(p, z'), symmetrised by
swapping the views (Eq. 2-3). No negatives; the predictor and the EMA target prevent
collapse. The target's decay tau rises from ``momentum`` (0.996) to 1 with a cosine schedule
(Sec. 3.2). BatchNorm in the MLPs (and a ResNet backbone) uses global-batch statistics.

Deviations: AdamW + warmup/cosine from ``optim.*`` instead of LARS; blur scaled to the image
size; the target is updated after each optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.losses.distillation import byol_regression
from framework.modules.ema import cosine_momentum, ema_update, frozen_copy
from framework.modules.heads import mlp
from framework.modules.sync_batchnorm import convert_to_global_batchnorm
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "resnet"


def view1() -> ViewConfig:
    # Table 6: crop (0.08, 1), flip, jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur p=1.0, solarize 0.
    return ViewConfig(blur=1.0, solarize=0.0)


def view2() -> ViewConfig:
    return ViewConfig(blur=0.1, solarize=0.2)


@dataclass
class Config(ObjectiveConfig):
    name: str = "byol"
    momentum: float = 0.996  # tau_base; cosine-increased to 1 over trainer.max_steps
    mlp_hidden_dim: int = 4096
    proj_dim: int = 256
    sync_batchnorm: bool = True
    view1: ViewConfig = field(default_factory=view1)
    view2: ViewConfig = field(default_factory=view2)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        o, data = self.cfg.objective, self.cfg.data
        for key in ("view1", "view2"):
            check_patch_size(getattr(o, key).size or data.image_size, self.cfg, f"objective.{key}.size")
        self.backbone = build_backbone(self.cfg)
        self.projector = mlp(self.backbone.feature_dim, o.mlp_hidden_dim, o.proj_dim)  # Linear-BN-ReLU-Linear
        self.predictor = mlp(o.proj_dim, o.mlp_hidden_dim, o.proj_dim)
        if o.sync_batchnorm:
            convert_to_global_batchnorm(self)
        self.target_backbone = frozen_copy(self.backbone)
        self.target_projector = frozen_copy(self.projector)
        self.augment1 = ViewAugment(o.view1, data.channels, data.image_size, "objective.view1")
        self.augment2 = ViewAugment(o.view2, data.channels, data.image_size, "objective.view2")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment1(images), self.augment2(images)]

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        # ``gather`` is unused: the loss is per sample; only BatchNorm looks across the batch.
        x = torch.cat(views)
        p1, p2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            z1, z2 = self.target_projector(self.target_backbone(x)).chunk(2)
        return byol_regression(p1, z2) + byol_regression(p2, z1)

    def momentum(self) -> float:
        return cosine_momentum(self.global_step, self.cfg.trainer.max_steps, self.cfg.objective.momentum)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):
            views = self.views(to_float_images(batch))
        loss = self.loss(views)
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/momentum", self.momentum())
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        momentum = self.momentum()  # tau_k of the step just taken
        super().optimizer_step(*args, **kwargs)
        ema_update(self.target_backbone, self.backbone, momentum)
        ema_update(self.target_projector, self.projector, momentum)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            views = self.views(to_float_images(val_images(batch)))
        self.record_val_loss(self.loss(views, gather=False), dataloader_idx)


    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.backbone  # the paper evaluates the online encoder


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    datamodule = image_datamodule(cfg)  # first: fills data.image_size / data.channels the model needs
    return Objective(config_to_dict(cfg)), datamodule
