"""A resumable stream of training items from tar shards, one per rank and dataloader worker.

Reading follows ``plan.worker_plan``; a modality-specific ``processor`` turns each raw sample
into zero or more items (decode, tokenize, pack); a seeded shuffle buffer mixes items.
``state_dict()`` is the exact position after the last item handed out: epoch, shard,
byte offset of the next sample, the processor's carry-over and the buffer, so a resumed
stream seeks to that offset instead of re-reading what it consumed.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Protocol

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.plan import worker_plan
from framework.data.sources import Shard, open_shard
from framework.data.tar import Sample, TarFormatError, iter_samples
from framework.errors import DataError

log = logging.getLogger(__name__)


class Processor(Protocol):
    """Turns one raw sample into a list of items; may carry state across samples (packing).

    It returns a list, not a generator, so its carried state is final before any of the
    items is handed out (the stream keeps the rest as ``pending``)."""

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


def _to_checkpointable(item: Any) -> Any:
    # Checkpoints are loaded with torch.load(weights_only=True): tensors pass, numpy does not.
    return torch.from_numpy(item) if isinstance(item, np.ndarray) else item


def _from_checkpointable(item: Any) -> Any:
    return item.numpy() if isinstance(item, torch.Tensor) else item


class ShardStream(IterableDataset):
    def __init__(
        self,
        shards: List[Shard],
        processor: Processor,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        infinite: bool = True,
        shuffle_buffer: int = 0,
        length: Optional[int] = None,
    ) -> None:
        if not shards:
            raise DataError("no shards to stream")
        self.shards = shards
        self.processor = processor
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.infinite = infinite
        self.shuffle_buffer = shuffle_buffer
        self.length = length
        self._state: Dict[str, Any] = {"epoch": 0, "position": 0, "offset": 0, "sample_index": 0, "yielded": 0}
        self._buffer: List[Any] = []
        self._pending: Deque[Any] = deque()
        self._rng = random.Random()
        self._resume: Optional[Dict[str, Any]] = None
        self._started = False

    def __len__(self) -> int:
        # A length stops Lightning from prefetching a batch ahead, which would put the
        # checkpointed loader position one batch past the last trained one.
        if self.length is None:
            raise TypeError("this stream has no length")
        return self.length

    # -- resumable state ----------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if not self._started:
            # Loaders snapshot a worker before it starts; its RNG is not seeded yet.
            return {"started": False}
        return {
            "started": True,
            **self._state,
            "processor": self.processor.state_dict(),
            "buffer": [_to_checkpointable(x) for x in self._buffer],
            "pending": [_to_checkpointable(x) for x in self._pending],
            "rng": self._rng.getstate(),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resume = state if state.get("started") else None

    # -- iteration ---------------------------------------------------------------------
    def _worker(self) -> tuple[int, int]:
        info = get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def __iter__(self) -> Iterator[Any]:
        worker, num_workers = self._worker()
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._state = {k: state[k] for k in ("epoch", "position", "offset", "sample_index", "yielded")}
            self.processor.load_state_dict(state["processor"])
            self._buffer = [_from_checkpointable(x) for x in state["buffer"]]
            self._pending = deque(_from_checkpointable(x) for x in state["pending"])
            self._rng.setstate(state["rng"])
        else:
            self._rng.seed(hash((self.seed, self.rank, worker)))
        self._started = True
        for item in self._items(worker, num_workers):
            if self.shuffle_buffer > 1:
                self._buffer.append(item)
                if len(self._buffer) < self.shuffle_buffer:
                    continue
                index = self._rng.randrange(len(self._buffer))
                self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
                item = self._buffer.pop()
            self._state["yielded"] += 1
            yield item
        while self._buffer:  # finite streams drain the buffer at the end
            item = self._buffer.pop(self._rng.randrange(len(self._buffer)))
            self._state["yielded"] += 1
            yield item

    def _items(self, worker: int, num_workers: int) -> Iterator[Any]:
        state = self._state
        produced_any = bool(self._pending)
        while self._pending:  # items of a sample read before a resume
            yield self._pending.popleft()
        while True:
            plan = worker_plan(len(self.shards), self.seed, state["epoch"], self.rank, self.world_size, worker, num_workers)
            while state["position"] < len(plan.shards):
                shard = self.shards[plan.shards[state["position"]]].url
                for key, sample, next_offset in self._read(shard, state["offset"]):
                    index = state["sample_index"]
                    state["sample_index"] += 1
                    state["offset"] = next_offset
                    if index % plan.stride != plan.phase:
                        continue
                    self._pending.extend(self.processor(key, sample, shard))
                    produced_any = produced_any or bool(self._pending)
                    while self._pending:
                        yield self._pending.popleft()
                state["position"] += 1
                state["offset"] = 0
                if plan.stride == 1:
                    state["sample_index"] = 0
            state["epoch"] += 1
            state["position"] = 0
            state["sample_index"] = 0
            if not self.infinite:
                return
            if not produced_any:
                raise DataError(f"the shards produced no samples for rank {self.rank} worker {worker}: {[s.url for s in self.shards[:3]]}")

    def _read(self, shard: str, offset: int) -> Iterator[tuple[str, Sample, int]]:
        try:
            with open_shard(shard, offset) as stream:
                yield from iter_samples(stream, offset)
        except (TarFormatError, UnicodeDecodeError) as exc:
            raise DataError(f"unreadable shard {shard}: {exc}") from exc
        except FileNotFoundError as exc:
            raise DataError(f"shard not found: {shard}") from exc


def collate_arrays(items: List[Any]) -> torch.Tensor:
    """Stack same-shaped numpy items into one tensor (cheaper than default_collate)."""
    return torch.from_numpy(np.stack(items))
