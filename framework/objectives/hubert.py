"""HuBERT: predict the discrete cluster of masked speech frames.

Hsu, Bolte, Tsai, Lakhotia, Salakhutdinov, Mohamed, "HuBERT: Self-Supervised Speech
Representation Learning by Masked Prediction of Hidden Units", IEEE/ACM TASLP 2021
(https://arxiv.org/abs/2106.07447); fairseq's ``hubert.py`` and ``hubert_criterion.py``.

* Targets: one cluster index per encoder frame, computed offline by ``pretrain audio targets``
  (iteration 1: k-means of MFCC; iteration 2: k-means of a trained model's layer features) and
  read from ``objective.targets`` by sample key, cropped with the clip.
* The same encoder as wav2vec 2.0 (framework/models/audio_encoder.py). Spans of
  ``mask_length`` frames (``mask_prob`` of the valid frames, at least ``min_masks``) are
  replaced by the mask embedding before the transformer.
* Each frame's output, projected to ``final_dim``, is scored against a learned embedding per
  cluster by cosine similarity / ``temperature`` (0.1); the loss is the cross-entropy of the
  frame's target, ``masked_weight`` x the mean over masked frames plus ``unmasked_weight`` x the
  mean over the others (Base: 1 and 0, Sec. 3.2), plus ``feature_penalty`` x the conv
  features' mean square; the conv encoder's gradient is scaled by ``feature_grad_scale``.
* Logged: the accuracy of the top-scoring cluster on masked and unmasked frames.

Exact across ranks: sums over frames are divided by the frame counts of all ranks.
Frames without a target (padding, a target file shorter than the clip) never enter the loss.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.data.audio_targets import TargetIndex
from framework.errors import ConfigError
from framework.losses.speech import cosine_targets
from framework.modules.gather import world_size
from framework.modules.span_masking import span_mask
from framework.objectives.audio_common import (
    AudioObjectiveHooks, audio_datamodule, batch_generator, build_encoder, global_sum, scale_gradient,
)
from framework.objectives.vision_common import ProbeConfig
from framework.objectives.wav2vec2 import check_masking
from framework.training.metrics import ValidationLosses

default_model = "audio_encoder"


@dataclass
class Config(ObjectiveConfig):
    name: str = "hubert"
    targets: str = ""  # the directory `pretrain audio targets` wrote
    clusters: int = 0  # 0: from the targets' meta.json (kept here, so checkpoints load without them)
    mask_prob: float = 0.8
    mask_length: int = 10
    min_masks: int = 2
    final_dim: int = 256
    temperature: float = 0.1
    masked_weight: float = 1.0
    unmasked_weight: float = 0.0
    feature_penalty: float = 10.0
    feature_grad_scale: float = 0.1
    probe: ProbeConfig = field(default_factory=ProbeConfig)


class Objective(ValidationLosses, AudioObjectiveHooks, LightningModule):
    def __init__(self, config: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        o = self.cfg.objective
        check_masking(o)
        if o.clusters < 2:
            raise ConfigError(f"objective.clusters must be at least 2 (set it, or objective.targets), not {o.clusters}")
        if o.masked_weight < 0 or o.unmasked_weight < 0 or o.masked_weight + o.unmasked_weight == 0:
            raise ConfigError("objective.masked_weight and objective.unmasked_weight must be >= 0, not both 0")
        self.encoder = build_encoder(self.cfg)
        self.project = nn.Linear(self.encoder.feature_dim, o.final_dim)
        self.label_embeddings = nn.Parameter(torch.randn(o.clusters, o.final_dim) * o.final_dim ** -0.5)
        self.init_validation()

    def draw(self, batch: dict, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """This batch's span masks (the loss is a deterministic function of the batch and them)."""
        o = self.cfg.objective
        frames = self.encoder.frame_lengths(batch["length"].cpu())
        size = int(self.encoder.frame_lengths(torch.tensor([batch["wave"].shape[1]]))[0])
        return {"mask": span_mask(frames, size, o.mask_prob, o.mask_length, o.min_masks, generator).to(batch["wave"].device)}

    def loss(self, batch: dict, drawn: Dict[str, torch.Tensor], gather: bool = True) -> torch.Tensor:
        o = self.cfg.objective
        raw, valid = self.encoder.encode(batch["wave"], batch["length"])
        raw = scale_gradient(raw, o.feature_grad_scale)
        x = self.encoder.contextualize(self.encoder.feature_norm(raw), valid, drawn["mask"] & valid)
        targets = batch["targets"][:, : x.shape[1]]
        if targets.shape[1] < x.shape[1]:  # the collate pads to the longest target row
            targets = nn.functional.pad(targets, (0, x.shape[1] - targets.shape[1]), value=-1)
        labelled = valid & (targets >= 0)
        ranks = world_size() if gather else 1
        total = torch.zeros((), device=x.device)
        logs = {}
        for name, where, weight in (("masked", labelled & drawn["mask"], o.masked_weight),
                                    ("unmasked", labelled & ~drawn["mask"], o.unmasked_weight)):
            count = global_sum(where.sum(), gather).clamp(min=1)
            if weight == 0:  # not computed (Base): only its count is logged
                continue
            per_frame, correct = cosine_targets(self.project(x[where]), self.label_embeddings, targets[where], o.temperature)
            total = total + weight * per_frame.sum() / count * ranks
            logs[f"{name}_accuracy"] = global_sum(correct.sum(), gather) / count
        penalty = (raw.float() ** 2 * valid[..., None]).sum() / (global_sum(valid.sum(), gather) * raw.shape[-1]) * ranks
        self._logs = {**logs, "feature_penalty": penalty.detach() / ranks}
        return total + o.feature_penalty * penalty

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.draw(batch, batch_generator(self, batch_idx, "train")))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in self._logs.items()})
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Validation clips the targets do not cover (held-out shards) give no loss, only probe features.
        if "targets" in batch and bool((batch["targets"] >= 0).any()):
            self.record_val_loss(self.loss(batch, self.draw(batch, batch_generator(self, batch_idx, "val")), gather=False), dataloader_idx)



def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    if not cfg.objective.targets:
        raise ConfigError("objective.targets is not set: write frame targets first with "
                          "`pretrain audio targets --shards <data.train> --output DIR --features mfcc`")
    targets = TargetIndex(cfg.objective.targets)
    targets.check_geometry(cfg.data.sample_rate, cfg.model.conv_layers)
    if cfg.objective.clusters and cfg.objective.clusters != targets.clusters:
        raise ConfigError(f"objective.clusters is {cfg.objective.clusters} but {cfg.objective.targets} holds "
                          f"{targets.clusters} clusters")
    cfg.objective.clusters = targets.clusters
    return Objective(config_to_dict(cfg)), audio_datamodule(cfg, targets)
