"""BEiT-style masked image modelling: predict the visual tokens of masked patches.

Bao, Dong, Piao, Wei, "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022
(https://arxiv.org/abs/2106.08254).

An image tokenizer turns every patch into a discrete visual token. About 40% of the
patches are hidden with BEiT's blockwise masking (Algorithm 1); their patch embeddings are
replaced by a learned [MASK] embedding, positions are added, and the whole sequence goes
through the ViT. A linear head over the final hidden state of each masked position predicts
its visual token (softmax over the codebook); the loss is the cross-entropy on masked
positions only (Eq. 1).

The tokenizer (``framework.modules.codebook.PatchCodebook``): BEiT uses DALL-E's dVAE,
trained beforehand on 250M images and frozen, which we cannot download. Here it is a k-means
codebook of ``codebook_size`` codes, fitted once on the first training batch of all ranks and
then frozen (saved in checkpoints), over one of two inputs:
- ``tokenizer: pixels`` (default): each patch's own pixels, standardised per patch. No other
  model needed; the codes are low-level (stroke pieces), coarser than a dVAE's, so the targets carry less semantics.
- ``tokenizer: teacher``: the patch-grid features of a frozen pretrained image backbone
  (``teacher``: any vision checkpoint of this framework, or a run directory for its newest
  checkpoint, e.g. a SimCLR run), as BEiT v2's VQ-KD quantizes a teacher's patch features
  (Peng et al., 2022, https://arxiv.org/abs/2208.06366; there a learned codebook, here k-means).
  The teacher sees each view at the resolution it was pretrained at; its last feature map is
  resized to the patch grid. It is read from its file when the run is built (also when
  resuming), never saved with this run, and never trained.

Deviations: the tokenizer (above); AdamW + warmup/cosine from ``optim.*``; no layer-scale or
relative position bias (fixed 2-D sine-cosine positions of the shared ViT); features pool
patch tokens (``model.pool``), as BEiT's linear probe averages them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError
from framework.losses.masked_image import masked_token_loss
from framework.modules.codebook import PatchCodebook
from framework.modules.patches import block_masking, patchify
from framework.objectives.vision_common import (
    VisionObjectiveHooks,
    ProbeConfig, batch_rng, build_backbone, check_patch_size, image_datamodule,
    require_vit, val_images,
)
from framework.training.metrics import ValidationLosses

default_model = "vit"


def beit_view() -> ViewConfig:
    # BEiT's pretraining augmentation: random resized crop, flip, colour jitter 0.4 (no grayscale/blur).
    return ViewConfig(scale=[0.08, 1.0], jitter=1.0, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0,
                      grayscale=0.0, blur=0.0)


@dataclass
class Config(ObjectiveConfig):
    name: str = "beit"
    mask_ratio: float = 0.4  # 75 of 196 patches in the paper
    min_mask_patches: int = 4  # smallest masked block (the paper: 16 at 14x14 patches)
    codebook_size: int = 8192  # visual vocabulary (the dVAE's size); the k-means tokenizer's code count
    tokenizer_iterations: int = 20  # k-means iterations
    tokenizer: str = "pixels"  # pixels | teacher: what the k-means codes are fitted on (module docstring)
    teacher: Optional[str] = None  # tokenizer: teacher - a vision checkpoint or .safetensors of this framework
    teacher_dim: Optional[int] = None  # filled from the teacher when the run is built (its feature map's channels)
    view: ViewConfig = field(default_factory=beit_view)
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class Objective(ValidationLosses, VisionObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        require_vit(self.cfg)
        o, data = self.cfg.objective, self.cfg.data
        if not 0.0 < o.mask_ratio < 1.0:
            raise ConfigError(f"objective.mask_ratio must be in (0, 1), got {o.mask_ratio}")
        if o.codebook_size < 2:
            raise ConfigError(f"objective.codebook_size must be >= 2, got {o.codebook_size}")
        check_patch_size(o.view.size or data.image_size, self.cfg, "objective.view.size")
        self.backbone = build_backbone(self.cfg)
        p = self.cfg.model.patch_size
        if o.tokenizer == "teacher":
            if o.teacher_dim is None:
                raise ConfigError("objective.teacher_dim is unset: build the run with beit.build(), which reads the teacher")
            code_dim = o.teacher_dim
        else:
            code_dim = p * p * data.channels
        self.tokenizer = PatchCodebook(o.codebook_size, code_dim)
        self._teacher: tuple[nn.Module, ...] = ()  # a tuple: not a submodule (not trained, saved or sharded)
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, self.cfg.model.dim))  # token width, not the pooled features
        nn.init.trunc_normal_(self.mask_embedding, std=0.02)
        self.head = nn.Linear(self.cfg.model.dim, o.codebook_size)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)
        self.augment = ViewAugment(o.view, data.channels, data.image_size, "objective.view")
        self.init_validation()

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        return [self.augment(images)]

    def mask(self, batch: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        o = self.cfg.objective
        return block_masking(batch, grid, o.mask_ratio, o.min_mask_patches).to(device)

    def tokenizer_inputs(self, images: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, C, H, W) views -> (N, L, D): what each patch's visual token is computed from."""
        o = self.cfg.objective
        if o.tokenizer != "teacher":
            return patchify(images, self.cfg.model.patch_size)
        if not self._teacher:  # an Objective made without build() (build hands over the one it read)
            self._teacher = (load_teacher(o.teacher, self.cfg.data.channels)[0],)
        teacher = self._teacher[0].to(images.device)  # a no-op after the first step
        size = teacher.image_size
        with torch.no_grad():
            if images.shape[-1] != size or images.shape[-2] != size:
                images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            features = teacher.feature_map(images.float())
            features = F.interpolate(features, size=grid, mode="bilinear", antialias=True, align_corners=False)
        return features.flatten(2).transpose(1, 2)

    def loss(self, views: list[torch.Tensor], gather: bool = True) -> torch.Tensor:
        images, vit = views[0], self.backbone
        grid = vit.grid(images.shape[-2], images.shape[-1])
        patches = self.tokenizer_inputs(images, grid)
        if not bool(self.tokenizer.fitted):
            if not (self.training and gather):
                raise RuntimeError("the BEiT tokenizer is fitted on the first training batch; none was seen yet")
            self.tokenizer.fit(patches.flatten(0, 1), self.cfg.objective.tokenizer_iterations, self.cfg.run.seed)
        targets = self.tokenizer.encode(patches)  # (N, L) visual tokens, no gradient
        mask = self.mask(images.shape[0], grid, images.device)
        tokens = vit.embed(images)
        tokens = torch.where(mask[..., None], self.mask_embedding.to(tokens.dtype), tokens)  # [MASK] replaces the patch
        hidden = vit.encode(tokens + vit.positions(images.shape[-2], images.shape[-1]))[:, 1:]
        return masked_token_loss(self.head(hidden), targets, mask)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> torch.Tensor:
        with batch_rng(self, batch_idx, "train"):  # crops and masks
            loss = self.loss(self.views(to_float_images(batch)))
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        with batch_rng(self, batch_idx, "val"):
            self.record_val_loss(self.loss(self.views(to_float_images(val_images(batch))), gather=False), dataloader_idx)


    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def export_backbone(self) -> torch.nn.Module:
        return self.backbone


def resolve_teacher(path: str) -> str:
    """A run directory stands for its newest checkpoint; a checkpoint file or directory for itself."""
    from framework.evaluate.backbone import resolve_checkpoint

    return str(resolve_checkpoint(path, "objective.teacher"))


def load_teacher(path: Optional[str], channels: int) -> tuple[nn.Module, int]:
    """The frozen backbone behind ``tokenizer: teacher`` and its feature map's channel count."""
    from framework.evaluate.backbone import load_backbone

    if not path:
        raise ConfigError("objective.tokenizer: teacher needs objective.teacher (a vision checkpoint of this framework)")
    if not Path(path).exists():
        raise ConfigError(f"objective.teacher: checkpoint not found: {path}")
    with torch.random.fork_rng(devices=[]):  # building it draws initial weights: keep the run's RNG stream
        teacher = load_backbone(resolve_teacher(path))
    if teacher.channels != channels:
        raise ConfigError(f"objective.teacher {path} takes {teacher.channels}-channel images, the data has {channels}")
    teacher.requires_grad_(False)
    return teacher, teacher.feature_map_dim


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    require_vit(cfg)  # before reading any data: only a ViT takes a [MASK] embedding per patch
    if cfg.objective.tokenizer not in ("pixels", "teacher"):
        raise ConfigError(f"objective.tokenizer must be 'pixels' or 'teacher', not {cfg.objective.tokenizer!r}")
    datamodule = image_datamodule(cfg)  # fills data.image_size / data.channels the model needs
    teacher = None
    if cfg.objective.tokenizer == "teacher":  # read it now: a bad path fails before any step
        teacher, cfg.objective.teacher_dim = load_teacher(cfg.objective.teacher, cfg.data.channels)
        cfg.objective.teacher = resolve_teacher(cfg.objective.teacher)  # pinned: a run dir's newest checkpoint now
    objective = Objective(config_to_dict(cfg))
    if teacher is not None:
        objective._teacher = (teacher,)  # read once per process, not again at the first step
    return objective, datamodule
