"""SimCLR: contrast two augmented views of each image against every other image in the batch.

Chen, Kornblith, Norouzi, Hinton, "A Simple Framework for Contrastive Learning of Visual
Representations", ICML 2020 (https://arxiv.org/abs/2002.05709).

Each image gives two views (random resized crop, flip, colour jitter of strength 1,
grayscale, blur; Appendix A). Backbone + projection MLP map them to z1, z2; NT-Xent makes
z1[i] pick z2[i] among the 2N-1 other embeddings of the *global* batch: the embeddings of
all ranks are gathered with their gradients, and BatchNorm statistics are global ("global
BN", Sec. 2.2 / Appendix B.5), so 2 ranks x b is the same loss as 1 rank x 2b.

Deviations: AdamW with warmup + cosine (``optim.*``) instead of LARS; the blur kernel and
sigma scale with the image size (the paper's numbers are for 224 px); any backbone of
``framework.models`` (the paper: ResNet-50).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.losses.contrastive import nt_xent
from framework.modules.heads import mlp
from framework.modules.sync_batchnorm import convert_to_global_batchnorm
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "resnet"


def simclr_view() -> ViewConfig:
    # Appendix A: crop scale (0.08, 1), flip, jitter (0.8s, 0.8s, 0.8s, 0.2s) with s = 1 at p = 0.8,
    # grayscale p = 0.2, Gaussian blur p = 0.5.
    return ViewConfig(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, blur=0.5)


@dataclass
class Config(ObjectiveConfig):
    name: str = "simclr"
    temperature: float = 0.5  # Table 5 / B.9: 0.5 at batch 256 ... 4096 (0.1 with LARS at 4096)
    proj_hidden_dim: int = 2048
    proj_dim: int = 128
    proj_layers: int = 2
    sync_batchnorm: bool = True  # BatchNorm statistics over all ranks (global BN)
    view: ViewConfig = field(default_factory=simclr_view)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        o, data = self.cfg.objective, self.cfg.data
        check_patch_size(o.view.size or data.image_size, self.cfg, "objective.view.size")
        self.backbone = build_backbone(self.cfg)
        self.projector = mlp(self.backbone.feature_dim, o.proj_hidden_dim, o.proj_dim, o.proj_layers)
        if o.sync_batchnorm:
            convert_to_global_batchnorm(self)
        self.augment = ViewAugment(o.view, data.channels, data.image_size, "objective.view")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images), self.augment(images)]

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        # Both views in one forward pass, so BatchNorm sees (and normalises) them together.
        z = self.projector(self.backbone(torch.cat(views)))
        z1, z2 = z.chunk(2)
        return nt_xent(z1, z2, self.cfg.objective.temperature, gather=gather)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):
            views = self.views(to_float_images(batch))
        loss = self.loss(views)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            views = self.views(to_float_images(val_images(batch)))
        # Ranks may hold different numbers of validation batches: no collective here.
        self.record_val_loss(self.loss(views, gather=False), dataloader_idx)


    def features(self, images: torch.Tensor) -> torch.Tensor:
        """What the online probes and ``load_backbone`` see."""
        return self.backbone(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.backbone


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    datamodule = image_datamodule(cfg)  # first: fills data.image_size / data.channels the model needs
    return Objective(config_to_dict(cfg)), datamodule
