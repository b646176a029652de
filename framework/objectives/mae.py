"""MAE: hide most patches, encode the visible ones, reconstruct the pixels of the hidden ones.

He, Chen, Xie, Li, Dollar, Girshick, "Masked Autoencoders Are Scalable Vision Learners",
CVPR 2022 (https://arxiv.org/abs/2111.06377).

Each image (random resized crop 0.2-1 and flip only) is cut into patches; a random
``mask_ratio`` (75%) of them is dropped per sample. The ViT encoder sees only the visible
patches (with their positions); a light decoder gets the encoded visible tokens plus a
shared, learned mask token at every hidden position (all with positions), and predicts
each patch's pixels. The loss is the mean squared error on the hidden patches only,
against pixels normalised per patch (``norm_pix_loss``). Positions are fixed 2-D sine-cosine
in encoder and decoder. The encoder alone is the pretrained backbone.

Deviations: AdamW + warmup/cosine from ``optim.*`` (the paper uses the same kind of
schedule); decoder sizes are set small by config for CPU; the backbone's features pool the
patch tokens (``model.pool``) where the paper's linear probe reads the class token.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError
from framework.losses.masked_image import masked_pixel_loss
from framework.models.transformer import TransformerBlock
from framework.models.vit import sincos_2d
from framework.modules.patches import patchify, random_masking
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    require_vit, val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "vit"


def mae_view() -> ViewConfig:
    # The paper's pretraining augmentation: RandomResizedCrop(scale 0.2-1) + flip, nothing else.
    return ViewConfig(scale=[0.2, 1.0], jitter=0.0, grayscale=0.0, blur=0.0, solarize=0.0)


@dataclass
class Config(ObjectiveConfig):
    name: str = "mae"
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    view: ViewConfig = field(default_factory=mae_view)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class Decoder(nn.Module):
    """Encoded visible tokens + mask tokens, in patch order -> predicted pixels of every patch."""

    def __init__(self, encoder_dim: int, dim: int, depth: int, heads: int, mlp_ratio: float, patch_pixels: int) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"objective.decoder_dim ({dim}) must be divisible by objective.decoder_heads ({heads})")
        self.dim = dim
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, mlp_ratio, 0.0, causal=False) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, patch_pixels)
        nn.init.normal_(self.mask_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def forward(self, encoded: torch.Tensor, restore: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        x = self.embed(encoded)  # (N, 1 + visible, dim), class token first
        n, length = restore.shape
        visible = x.shape[1] - 1
        tokens = torch.cat([x[:, 1:], self.mask_token.expand(n, length - visible, -1)], dim=1)
        tokens = torch.gather(tokens, 1, restore[..., None].expand(-1, -1, self.dim))  # back to patch order
        tokens = tokens + sincos_2d(*grid, self.dim, tokens.device).to(tokens.dtype)[None]
        x = torch.cat([x[:, :1], tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]  # (N, L, p*p*C)


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        require_vit(self.cfg)
        o, data = self.cfg.objective, self.cfg.data
        if not 0.0 < o.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio must be in (0, 1), got {o.mask_ratio}")
        check_patch_size(o.view.size or data.image_size, self.cfg, "objective.view.size")
        self.backbone = build_backbone(self.cfg)
        p = self.cfg.model.patch_size
        self.decoder = Decoder(self.cfg.model.dim, o.decoder_dim, o.decoder_depth, o.decoder_heads,
                               self.cfg.model.mlp_ratio, p * p * data.channels)
        self.augment = ViewAugment(o.view, data.channels, data.image_size, "objective.view")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images)]

    def reconstruct(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(predicted pixels of every patch (N, L, p*p*C), mask (N, L) True = hidden)."""
        vit = self.backbone
        tokens = vit.embed(images) + vit.positions(images.shape[-2], images.shape[-1])
        n, length, dim = tokens.shape
        keep, mask, restore = random_masking(n, length, self.cfg.objective.mask_ratio, tokens.device)
        visible = torch.gather(tokens, 1, keep[..., None].expand(-1, -1, dim))
        encoded = vit.encode(visible)  # the encoder never sees a mask token
        # ``restore`` orders [visible (in ``keep`` order), hidden] back into patch order.
        return self.decoder(encoded, restore, vit.grid(images.shape[-2], images.shape[-1])), mask

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        images = views[0]
        prediction, mask = self.reconstruct(images)
        target = patchify(images, self.cfg.model.patch_size)
        return masked_pixel_loss(prediction, target, mask, self.cfg.objective.norm_pix_loss)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):  # crops and masks
            loss = self.loss(self.views(to_float_images(batch)))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            self.record_val_loss(self.loss(self.views(to_float_images(val_images(batch)))), dataloader_idx)


    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)  # all patches visible, as after pretraining

    def export_backbone(self) -> torch.nn.Module:
        return self.backbone


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    require_vit(cfg)  # before reading any data: a ResNet cannot take a subset of patches
    datamodule = image_datamodule(cfg)  # fills data.image_size / data.channels the model needs
    return Objective(config_to_dict(cfg)), datamodule
