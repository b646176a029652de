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
