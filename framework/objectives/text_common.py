"""Pieces the text objectives share: vocabulary size, special ids, data, config in hparams."""
from __future__ import annotations

from typing import Dict

from framework.config.schema import RunConfig
from framework.data.text import TextDataModule
from framework.errors import ConfigError
from framework.text.tokenizer import load_tokenizer, special_token_ids


def tokenizer_facts(cfg: RunConfig) -> tuple[int, Dict[str, int]]:
    """(model vocabulary size, special token ids) from ``data.tokenizer``."""
    if not cfg.data.tokenizer:
        raise ConfigError(f"data.tokenizer is required by objective '{cfg.objective.name}' (a tokenizer.json)")
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    vocab = tokenizer.get_vocab_size()
    if cfg.model.vocab_size and cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's {vocab}")
    # Round up to a multiple of 64: faster matmuls, room for tokens added later.
    return cfg.model.vocab_size or (vocab + 63) // 64 * 64, special_token_ids(tokenizer)


def text_datamodule(cfg: RunConfig) -> TextDataModule:
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    return TextDataModule(cfg.data, cfg.run.seed, block_len=cfg.data.seq_len)


class TokenLossValidation:
    """The text objectives' validation: the token-weighted loss and perplexity over ``data.val``,
    as ``val/loss``, ``val/ppl``; with named sets (``data.val: {old: ..., new: ...}``) one pair
    per set, ``val/old/loss``, ``val/new/ppl``, ...: what forgetting is measured with."""

    def init_validation(self) -> None:
        from torch import nn
        from torchmetrics import MeanMetric

        from framework.data.loader import val_set_names

        self.val_names = val_set_names(self.cfg.data.val) or [""]
        self.val_losses = nn.ModuleList(MeanMetric() for _ in self.val_names)

    def on_validation_epoch_end(self) -> None:
        from framework.training.metrics import log_token_loss

        for name, metric in zip(self.val_names, self.val_losses):
            log_token_loss(self, metric, prefix=f"val/{name}" if name else "val")
