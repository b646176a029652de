"""Pieces the speech objectives share: the encoder from config, clip data, per-batch randomness,
frame counts over all ranks, probes on pooled features, FLOPs. Not a base class: each objective
file reads top to bottom and calls these."""
from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch import LightningModule

from framework.config.schema import RunConfig
from framework.data.audio import AudioDataModule
from framework.errors import ConfigError
from framework.models.audio_encoder import AudioEncoder, AudioEncoderConfig
from framework.modules.gather import world_size
from framework.objectives.vision_common import batch_rng, count_flops, probe_callbacks
from framework.training.optim import build_optimizer


def build_encoder(cfg: RunConfig) -> AudioEncoder:
    if not isinstance(cfg.model, AudioEncoderConfig):
        raise ConfigError(f"objective '{cfg.objective.name}' needs model.name=audio_encoder, not model.name={cfg.model.name}")
    try:
        return AudioEncoder(cfg.model)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def audio_datamodule(cfg: RunConfig, targets: Any = None) -> AudioDataModule:
    if not isinstance(cfg.model, AudioEncoderConfig):
        raise ConfigError(f"objective '{cfg.objective.name}' needs model.name=audio_encoder, not model.name={cfg.model.name}")
    return AudioDataModule(cfg.data, cfg.run.seed, conv_layers=cfg.model.conv_layers, targets=targets)


def batch_generator(module: LightningModule, batch_idx: int, stage: str) -> torch.Generator:
    """A generator seeded by (run seed, step, batch, rank, stage): masks, distractors and noise
    are drawn from it, so a resumed run draws what an uninterrupted one would."""
    with batch_rng(module, batch_idx, stage):
        return torch.Generator().manual_seed(int(torch.randint(2**62, ()).item()))


def global_sum(value: torch.Tensor, gather: bool) -> torch.Tensor:
    """Sum of a count over ranks (no gradient); the value itself without ``gather``."""
    value = value.detach().float().clone()
    if gather and world_size() > 1:
        torch.distributed.all_reduce(value)
    return value


def scale_gradient(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity forward; the gradient times ``scale`` (fairseq's feature_grad_mult: the conv
    encoder learns more slowly than the transformer)."""
    return x if scale == 1.0 else x * scale + x.detach() * (1.0 - scale)


class AudioObjectiveHooks:
    """The Lightning hooks every speech objective shares. A mixin, listed before LightningModule."""

    def features(self, batch: dict) -> torch.Tensor:
        """What the online probes and ``load_backbone`` see: the mean over valid frames."""
        return self.encoder(batch["wave"], batch["length"])

    def probe_features(self, batch: dict) -> Optional[torch.Tensor]:
        return self.features(batch)

    def export_backbone(self) -> torch.nn.Module:
        return self.encoder

    def flops_per_sample(self, batch: dict) -> float:
        sample = {key: value[:2] for key, value in batch.items()}
        return count_flops(self, lambda: self.loss(sample, self.draw(sample, torch.Generator().manual_seed(0))), 2)

    def configure_callbacks(self):
        return probe_callbacks(self, self.cfg.objective.probe)

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)
