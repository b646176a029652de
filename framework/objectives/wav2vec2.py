"""wav2vec 2.0: from masked speech, pick the true quantized frame among distractors.

Baevski, Zhou, Mohamed, Auli, "wav2vec 2.0: A Framework for Self-Supervised Learning of Speech
Representations", NeurIPS 2020 (https://arxiv.org/abs/2006.11477); fairseq's ``wav2vec2.py``,
``gumbel_vector_quantizer.py`` and ``wav2vec_criterion.py``.

* The conv encoder turns the waveform into frames; spans of ``mask_length`` frames (about
  ``mask_prob`` of the valid frames, at least ``min_masks`` spans) are replaced by a learned
  mask embedding before the transformer (Sec. 3.1).
* The unmasked conv features of the masked frames are quantized: ``codebooks`` x
  ``codebook_entries`` choices by a straight-through Gumbel softmax whose temperature falls
  from ``quantizer_temperature[0]`` to ``[1]``, reaching it at ``quantizer_anneal`` of
  ``trainer.max_steps`` (Base: 2 -> 0.5 at 277k of 400k updates), so a short run anneals too.
* The contrastive loss (Eq. 3): each masked frame's transformer output, projected, must pick its
  own quantized target (cosine similarity / ``temperature``) among ``distractors`` drawn from the
  other masked frames of the same utterance, never itself and never padding.
* Plus ``diversity_weight`` x the codebook diversity loss (Eq. 4: the soft code distribution,
  averaged over the batch, should use every entry) and ``feature_penalty`` x the conv features'
  mean square; the conv encoder's gradient is scaled by ``feature_grad_scale`` (fairseq's 0.1).
* Logged: the code perplexity (how many entries the hard choices use: a collapse shows here),
  the soft probability perplexity, the temperature and the accuracy of picking the target.

Exact across ranks: every sum over frames is divided by the frame count of all ranks, and the
diversity loss uses the code distribution of all ranks (summed with gradients), so 2 ranks x b
give the loss and gradients of 1 rank x 2b for the same masks, distractors and noise.
Deviations: pre-norm transformer blocks; sizes for small data; AdamW, warmup + cosine (``optim.*``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from torch import nn

from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError
from framework.losses.speech import contrastive_frames, diversity_loss
from framework.modules.gather import all_reduce_sum_with_grad, world_size
from framework.modules.quantizer import GumbelQuantizer, perplexity
from framework.modules.span_masking import sample_distractors, span_mask
from framework.objectives.audio_common import (
    AudioObjectiveHooks, audio_datamodule, batch_generator, build_encoder, global_sum, scale_gradient,
)
from framework.objectives.vision_common import ProbeConfig
from framework.training.metrics import ValidationLosses

default_model = "audio_encoder"


@dataclass
class Config(ObjectiveConfig):
    name: str = "wav2vec2"
    mask_prob: float = 0.65
    mask_length: int = 10
    min_masks: int = 2
    codebooks: int = 2  # G
    codebook_entries: int = 320  # V
    final_dim: int = 256  # the width the predictions and the quantized targets are compared in
    distractors: int = 100  # K
    temperature: float = 0.1  # of the cosine logits (kappa)
    quantizer_temperature: List[float] = field(default_factory=lambda: [2.0, 0.5])
    quantizer_anneal: float = 0.7  # fraction of trainer.max_steps at which the end temperature is reached
    diversity_weight: float = 0.1  # alpha
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
        if len(o.quantizer_temperature) != 2 or not 0 < o.quantizer_temperature[1] <= o.quantizer_temperature[0]:
            raise ConfigError(f"objective.quantizer_temperature must be [start, end] with 0 < end <= start, not {o.quantizer_temperature}")
        if o.codebooks < 1 or o.codebook_entries < 2 or o.distractors < 1:
            raise ConfigError("objective.codebooks >= 1, objective.codebook_entries >= 2 and objective.distractors >= 1")
        if o.final_dim % o.codebooks:
            raise ConfigError(f"objective.final_dim ({o.final_dim}) must be divisible by objective.codebooks ({o.codebooks})")
        self.encoder = build_encoder(self.cfg)
        self.quantizer = GumbelQuantizer(self.encoder.conv_dim, o.codebooks, o.codebook_entries, o.final_dim)
        self.project_targets = nn.Linear(o.final_dim, o.final_dim)
        self.project_predictions = nn.Linear(self.encoder.feature_dim, o.final_dim)
        self.init_validation()

    def quantizer_temperature(self) -> float:
        start, end = self.cfg.objective.quantizer_temperature
        anneal = max(1, int(self.cfg.objective.quantizer_anneal * self.cfg.trainer.max_steps))
        return max(end, start * (end / start) ** (self.global_step / anneal))

    def draw(self, batch: dict, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """This batch's randomness: span masks, distractors and Gumbel noise (the loss is a
        deterministic function of the batch and these)."""
        o = self.cfg.objective
        frames = self.encoder.frame_lengths(batch["length"].cpu())
        size = int(self.encoder.frame_lengths(torch.tensor([batch["wave"].shape[1]]))[0])
        mask = span_mask(frames, size, o.mask_prob, o.mask_length, o.min_masks, generator)
        masked = int(mask.sum())
        uniform = torch.rand(masked, o.codebooks * o.codebook_entries, generator=generator).clamp_(1e-10, 1 - 1e-10)
        device = batch["wave"].device
        return {"mask": mask.to(device), "distractors": sample_distractors(mask, o.distractors, generator).to(device),
                "gumbel": (-torch.log(-torch.log(uniform))).to(device)}

    def loss(self, batch: dict, drawn: Dict[str, torch.Tensor], gather: bool = True) -> torch.Tensor:
        o = self.cfg.objective
        raw, valid = self.encoder.encode(batch["wave"], batch["length"])
        raw = scale_gradient(raw, o.feature_grad_scale)
        features = self.encoder.feature_norm(raw)
        mask = drawn["mask"] & valid
        x = self.encoder.contextualize(features, valid, mask)
        predictions = self.project_predictions(x[mask])  # (M, final_dim), masked frames in (b, t) order
        codes, probs_sum, hard_counts = self.quantizer(features[mask], self.quantizer_temperature(), drawn["gumbel"])
        targets = self.project_targets(codes)
        per_frame, correct = contrastive_frames(predictions, targets, utterance_distractors(drawn["distractors"], mask),
                                                o.temperature)
        ranks = world_size() if gather else 1
        masked = global_sum(mask.sum(), gather).clamp(min=1)
        contrastive = per_frame.sum() / masked * ranks
        probs = all_reduce_sum_with_grad(probs_sum) if gather else probs_sum
        diversity = diversity_loss(probs)
        penalty = (raw.float() ** 2 * valid[..., None]).sum() / (global_sum(valid.sum(), gather) * raw.shape[-1]) * ranks
        self._logs = {
            "code_perplexity": perplexity(global_sum(hard_counts, gather)),
            "prob_perplexity": perplexity(probs.detach()),
            "accuracy": global_sum(correct.sum(), gather) / masked,
            "contrastive": contrastive.detach() / ranks,
        }
        self._per_frame = per_frame.detach()
        return contrastive + o.diversity_weight * diversity + o.feature_penalty * penalty

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(batch, self.draw(batch, batch_generator(self, batch_idx, "train")))
        self.log("train/loss", loss, prog_bar=True)
        self.log_dict({f"train/{k}": v for k, v in self._logs.items()})
        self.log("train/quantizer_temperature", self.quantizer_temperature())
        return loss

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        # Ranks may hold different numbers of validation batches: no collective here.
        self.record_val_loss(self.loss(batch, self.draw(batch, batch_generator(self, batch_idx, "val")), gather=False), dataloader_idx)



def utterance_distractors(distractors: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-utterance distractor indices (B, M_b, K) -> indices into all masked frames of the batch
    in (b, t) order (M, K); -1 stays -1."""
    counts = mask.sum(1)
    offsets = torch.cumsum(counts, 0) - counts
    rows = [distractors[b, : int(counts[b])] for b in range(mask.shape[0])]
    shifted = [torch.where(r >= 0, r + offsets[b], r) for b, r in enumerate(rows)]
    return torch.cat(shifted) if shifted else distractors.new_zeros((0, distractors.shape[-1]))


def check_masking(o: ObjectiveConfig) -> None:
    if not 0 < o.mask_prob <= 1 or o.mask_length < 1 or o.min_masks < 0:
        raise ConfigError(f"objective.mask_prob must be in (0, 1], objective.mask_length >= 1 and objective.min_masks >= 0; "
                          f"got {o.mask_prob}, {o.mask_length}, {o.min_masks}")


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    datamodule = audio_datamodule(cfg)
    return Objective(config_to_dict(cfg)), datamodule
