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
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from framework.config.schema import DataConfig
from framework.data.sources import resolve_shards
from framework.data.stream import ShardStream, collate_arrays
from framework.data.tar import Sample

log = logging.getLogger(__name__)


class TokenPacker:
    def __init__(self, tokenizer_path: str, block_len: int, text_key: str = "txt") -> None:
        self.tokenizer_path = tokenizer_path
        self.block_len = block_len
        self.text_key = text_key
        self._tokenizer = None  # loaded lazily, inside the dataloader worker
        self._eos = -1
        self._carry = np.empty(0, dtype=np.int32)
        self.skipped_samples = 0

    def _load(self) -> None:
        from framework.text.tokenizer import load_tokenizer, special_token_ids

        self._tokenizer = load_tokenizer(self.tokenizer_path)
        self._eos = special_token_ids(self._tokenizer)["eos"]

    def __call__(self, key: str, sample: Sample, shard: str) -> List[np.ndarray]:
        if self._tokenizer is None:
            self._load()
        data = sample.get(self.text_key)
        try:
            if data is None:
                raise ValueError(f"no .{self.text_key} member")
            text = data.decode("utf-8")
        except (UnicodeDecodeError, ValueError) as exc:
            self.skipped_samples += 1
            log.warning("skipping sample %s in %s: %s", key, shard, exc)
            return []
        ids = np.asarray(self._tokenizer.encode(text).ids + [self._eos], dtype=np.int32)
        tokens = np.concatenate([self._carry, ids]) if self._carry.size else ids
        full = len(tokens) // self.block_len * self.block_len
        self._carry = tokens[full:]
        return [tokens[start : start + self.block_len].astype(np.int64) for start in range(0, full, self.block_len)]

    def state_dict(self) -> Dict[str, Any]:
        return {"carry": torch.from_numpy(self._carry.copy()), "skipped_samples": self.skipped_samples}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._carry = np.asarray(state["carry"].numpy(), dtype=np.int32)
        self.skipped_samples = int(state["skipped_samples"])


class TextDataModule(LightningDataModule):
    """Train: an endless packed token stream per rank; val: one pass over held-out shards."""

    def __init__(self, data: DataConfig, seed: int, block_len: int, train_batches: int) -> None:
        super().__init__()
        self.data, self.seed, self.block_len, self.train_batches = data, seed, block_len, train_batches
        self.train_shards = resolve_shards(data.train, "data.train")
        self.val_shards = resolve_shards(data.val, "data.val") if data.val else []

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> StatefulDataLoader:
        rank, world = self._rank_world()
        stream = ShardStream(
            self.train_shards,
            TokenPacker(self.data.tokenizer, self.block_len),
            seed=self.seed,
            rank=rank,
            world_size=world,
            infinite=True,
            shuffle_buffer=self.data.shuffle_buffer,
            length=self.train_batches * self.data.batch_size,
        )
        return StatefulDataLoader(
            stream,
            batch_size=self.data.batch_size,
            num_workers=self.data.num_workers,
            collate_fn=collate_arrays,
            persistent_workers=False,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.val_shards:
            return []
        rank, world = self._rank_world()
        stream = ShardStream(
            self.val_shards,
            TokenPacker(self.data.tokenizer, self.block_len),
            seed=self.seed,
            rank=rank,
            world_size=world,
            infinite=False,
        )
        return DataLoader(
            stream,
            batch_size=self.data.val_batch_size or self.data.batch_size,
            num_workers=min(self.data.num_workers, 1),
            collate_fn=collate_arrays,
        )
