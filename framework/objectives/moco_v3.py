"""MoCo v3: a query encoder with a predictor against a momentum key encoder, symmetric InfoNCE.

Chen, Xie, He, "An Empirical Study of Training Self-Supervised Vision Transformers",
ICCV 2021 (https://arxiv.org/abs/2104.02057), Algorithm 1.

Two views x1, x2 of each image. The base encoder (backbone + projector + predictor) gives
queries q1, q2; the momentum encoder (an EMA of backbone + projector, no predictor) gives
keys k1, k2. Loss = ctr(q1, k2) + ctr(q2, k1), where ctr is InfoNCE against the keys of the
whole global batch (gathered from all ranks: the other images are the negatives; no queue),
scaled by 2 tau as in the paper's code. The momentum follows a cosine schedule from
``momentum`` to 1. BatchNorm in the MLP heads (and in a ResNet backbone) uses global-batch
statistics (SyncBN in the paper). Augmentations are BYOL's asymmetric pair.

Deviations: AdamW + warmup/cosine from ``optim.*`` (the paper: AdamW for ViT, LARS for
ResNet); the patch projection of a ViT is trained (the paper's "random patch projection"
trick for stability is not applied); blur scaled to the image size; the momentum encoder is
updated after each optimizer step, which equals the paper's update at the start of the next.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.losses.contrastive import info_nce
from framework.modules.ema import cosine_momentum, ema_update, frozen_copy
from framework.modules.heads import mlp
from framework.modules.sync_batchnorm import convert_to_global_batchnorm
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "vit"


def byol_view1() -> ViewConfig:
    # BYOL Table 6 (used by MoCo v3): jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur always, no solarize.
    return ViewConfig(blur=1.0, solarize=0.0)


def byol_view2() -> ViewConfig:
    return ViewConfig(blur=0.1, solarize=0.2)


@dataclass
class Config(ObjectiveConfig):
    name: str = "moco_v3"
    temperature: float = 0.2  # 0.2 for ViT; the paper uses 1.0 for ResNet-50
    momentum: float = 0.99  # base momentum of the key encoder, cosine-increased to 1
    mlp_hidden_dim: int = 4096
    dim: int = 256  # output of projector and predictor
    proj_layers: int = 3  # 3 for ViT, 2 for ResNet in the paper
    pred_layers: int = 2
    sync_batchnorm: bool = True
    view1: ViewConfig = field(default_factory=byol_view1)
    view2: ViewConfig = field(default_factory=byol_view2)
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
        # The paper's projector ends in an affine-free BN; the predictor does not.
        self.projector = mlp(self.backbone.feature_dim, o.mlp_hidden_dim, o.dim, o.proj_layers, last_batch_norm=True)
        self.predictor = mlp(o.dim, o.mlp_hidden_dim, o.dim, o.pred_layers)
        if o.sync_batchnorm:
            convert_to_global_batchnorm(self)
        self.momentum_backbone = frozen_copy(self.backbone)
        self.momentum_projector = frozen_copy(self.projector)
        self.augment1 = ViewAugment(o.view1, data.channels, data.image_size, "objective.view1")
        self.augment2 = ViewAugment(o.view2, data.channels, data.image_size, "objective.view2")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment1(images), self.augment2(images)]

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        x = torch.cat(views)  # one pass per network: BatchNorm sees both views together
        q1, q2 = self.predictor(self.projector(self.backbone(x))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_backbone(x)).chunk(2)
        t = self.cfg.objective.temperature
        return info_nce(q1, k2, t, gather) + info_nce(q2, k1, t, gather)

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
        momentum = self.momentum()  # the schedule's value at the step just taken
        super().optimizer_step(*args, **kwargs)
        ema_update(self.momentum_backbone, self.backbone, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            views = self.views(to_float_images(val_images(batch)))
        self.record_val_loss(self.loss(views, gather=False), dataloader_idx)  # ranks' batch counts may differ: no collective


    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.backbone  # the paper evaluates the base (query) encoder


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    datamodule = image_datamodule(cfg)  # first: fills data.image_size / data.channels the model needs
    return Objective(config_to_dict(cfg)), datamodule
