"""Text samples -> fixed-length token blocks: tokenize each document, append EOS, pack.

Packing concatenates documents so no compute is spent on padding; the tokens left over
after the last full block carry into the next document and are part of the stream state.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from framework.config.schema import DataConfig
from framework.data.loader import ShardDataMixin, train_loader, val_loader
from framework.data.tar import Sample
from framework.errors import SampleError

log = logging.getLogger(__name__)


def sample_text(sample: Sample, key: str) -> str:
    """The UTF-8 text of member ``key`` of a sample; a SampleError names what is wrong."""
    data = sample.get(key)
    if data is None:
        raise SampleError(f"no .{key} member (members: {sorted(sample)})")
    try:
        return str(data, "utf-8")
    except UnicodeDecodeError as exc:
        raise SampleError(f"not UTF-8 text: {exc}") from None


class TokenPacker:
    one_to_one = False  # a document gives any number of blocks

    def __init__(self, tokenizer_path: str, block_len: int, text_key: str = "txt") -> None:
        self.tokenizer_path = tokenizer_path
        self.block_len = block_len
        self.text_key = text_key
        self._tokenizer = None  # loaded lazily, inside the dataloader worker
        self._eos = -1
        self._carry = np.empty(0, dtype=np.int32)

    def _load(self) -> None:
        from framework.text.tokenizer import load_tokenizer, special_token_ids

        self._tokenizer = load_tokenizer(self.tokenizer_path)
        self._eos = special_token_ids(self._tokenizer)["eos"]

    def __call__(self, key: str, sample: Sample, shard: str) -> List[np.ndarray]:
        if self._tokenizer is None:
            self._load()
        ids = np.asarray(self._tokenizer.encode(sample_text(sample, self.text_key)).ids + [self._eos], dtype=np.int32)
        tokens = np.concatenate([self._carry, ids]) if self._carry.size else ids
        full = len(tokens) // self.block_len * self.block_len
        self._carry = tokens[full:]
        return [tokens[start : start + self.block_len].astype(np.int64) for start in range(0, full, self.block_len)]

    def count_tokens(self, sample: Sample) -> int:
        """Tokens this document adds to the stream (its own, and the end-of-text), leaving the
        packing state alone (``data inspect --verify``)."""
        if self._tokenizer is None:
            self._load()
        return len(self._tokenizer.encode(sample_text(sample, self.text_key)).ids) + 1

    def state_dict(self) -> Dict[str, Any]:
        return {"carry": torch.from_numpy(self._carry.copy())}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._carry = np.asarray(state["carry"].numpy(), dtype=np.int32)


class TextDataModule(ShardDataMixin, LightningDataModule):
    """Train: an endless packed token stream per rank; val: one pass over held-out shards."""

    def __init__(self, data: DataConfig, seed: int, block_len: int) -> None:
        super().__init__()
        self.data, self.seed, self.block_len = data, seed, block_len
        self.resolve_data(data)

    def processor(self) -> TokenPacker:
        """How a sample becomes items (``data inspect --verify`` decodes with it too)."""
        return TokenPacker(self.data.tokenizer, self.block_len)

    def train_dataloader(self):
        rank, world = self._rank_world()
        return train_loader(
            self.train_shards, self.processor(), self.data,
            seed=self.seed, rank=rank, world_size=world, sources=self.sources,
        )

    def val_dataloader(self):
        if not self.val_shards:
            return []
        rank, world = self._rank_world()
        return val_loader(
            self.val_shards, self.processor(), self.data,
            seed=self.seed, rank=rank, world_size=world,
        )
