"""BERT-style masked language modelling.

Devlin et al., "BERT: Pre-training of Deep Bidirectional Transformers" (2019). 15% of
tokens are chosen; of those 80% become <|mask|>, 10% a random token, 10% stay; the
bidirectional encoder predicts the original tokens at the chosen positions.
Deviations: no next-sentence prediction (RoBERTa showed it does not help); masks are drawn
on the device each step (dynamic masking, as RoBERTa) rather than fixed in the data.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.errors import ConfigError
from framework.losses.language import IGNORE_INDEX, masked_token_loss
from framework.models.transformer import Transformer
from framework.modules.masking import mask_tokens
from framework.objectives.text_common import text_datamodule, tokenizer_facts
from framework.training.metrics import ValidationLosses
from framework.training.optim import build_optimizer

default_model = "transformer"


@dataclass
class Config(ObjectiveConfig):
    name: str = "mlm"
    mask_prob: float = 0.15  # fraction of tokens chosen for prediction
    replace_with_mask: float = 0.8  # of those: replaced by <|mask|>
    replace_with_random: float = 0.1  # ... by a random token; the rest are kept


class Objective(ValidationLosses, LightningModule):
    val_perplexity = True

    def __init__(self, config: dict, vocab_size: int, special_ids: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.cfg: RunConfig = config_from_dict(config)
        self.special_ids = special_ids
        self.vocab_size = vocab_size
        self.model = Transformer(self.cfg.model, vocab_size, causal=False)
        self.init_validation()

    def _loss(self, tokens: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, int]:
        objective = self.cfg.objective
        inputs, labels = mask_tokens(
            tokens,
            mask_id=self.special_ids["mask"],
            vocab_size=self.vocab_size,
            mask_prob=objective.mask_prob,
            replace_with_mask=objective.replace_with_mask,
            replace_with_random=objective.replace_with_random,
            special_ids=[self.special_ids["eos"], self.special_ids["pad"]],
            generator=generator,
        )
        loss = masked_token_loss(self.model.logits(self.model(inputs)), labels)
        return loss, int((labels != IGNORE_INDEX).sum())

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(tokens)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, tokens: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        # The same masks at every validation, so validation losses are comparable.
        generator = torch.Generator(device=tokens.device).manual_seed(self.cfg.run.seed * 100_003 + batch_idx)
        loss, targets = self._loss(tokens, generator)
        if targets:
            self.record_val_loss(loss, dataloader_idx, weight=targets)

    def health_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """A sequence's embedding for the representation-health monitor: its mean hidden state."""
        return self.model(tokens).mean(dim=1)

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    objective = cfg.objective
    if not 0 < objective.mask_prob < 1 or objective.replace_with_mask + objective.replace_with_random > 1:
        raise ConfigError("objective: need 0 < mask_prob < 1 and replace_with_mask + replace_with_random <= 1")
    vocab_size, special_ids = tokenizer_facts(cfg)
    return Objective(config_to_dict(cfg), vocab_size, special_ids), text_datamodule(cfg)
