"""GPT-style causal language modelling: predict every next token.

Radford et al., "Improving Language Understanding by Generative Pre-Training" (2018).
Data: documents tokenized, separated by EOS and packed into blocks of ``data.seq_len``
tokens; position t of a block predicts token t+1 (the block's first token is context only).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from lightning.pytorch import LightningDataModule, LightningModule

from framework.config.load import config_from_dict, config_to_dict
from framework.config.schema import ObjectiveConfig, RunConfig
from framework.losses.language import next_token_loss
from framework.models.transformer import Transformer
from framework.objectives.text_common import text_datamodule, tokenizer_facts
from framework.training.metrics import ValidationLosses
from framework.training.optim import build_optimizer

default_model = "transformer"


@dataclass
class Config(ObjectiveConfig):
    name: str = "clm"


class Objective(ValidationLosses, LightningModule):
    val_perplexity = True

    def __init__(self, config: dict, vocab_size: int, special_ids: dict) -> None:
        super().__init__()
        self.save_hyperparameters()  # the resolved run config travels with every checkpoint
        self.cfg: RunConfig = config_from_dict(config)
        self.model = Transformer(self.cfg.model, vocab_size, causal=True)
        self.init_validation()

    def training_step(self, tokens: torch.Tensor, batch_idx: int) -> torch.Tensor:
        loss = next_token_loss(self.model.logits(self.model(tokens)), tokens)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, tokens: torch.Tensor, batch_idx: int, dataloader_idx: int = 0) -> None:
        loss = next_token_loss(self.model.logits(self.model(tokens)), tokens)
        self.record_val_loss(loss, dataloader_idx, weight=tokens[:, 1:].numel())

    def health_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """A sequence's embedding for the representation-health monitor: its mean hidden state."""
        return self.model(tokens).mean(dim=1)

    def configure_optimizers(self):
        return build_optimizer(self, self.cfg.optim, self.cfg.trainer.max_steps)


def build(cfg: RunConfig) -> tuple[LightningModule, LightningDataModule]:
    vocab_size, special_ids = tokenizer_facts(cfg)
    return Objective(config_to_dict(cfg), vocab_size, special_ids), text_datamodule(cfg)
