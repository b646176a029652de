"""A resumable stream of training items from tar shards, one per rank and dataloader worker.

What a reader reads comes from ``plan`` (epoch mode: a range of the epoch's shuffled
sample sequence; resampled mode: an endless series of weighted shard draws). Raw samples
pass a seeded shuffle buffer, then a modality-specific ``processor`` turns each into items.

``state_dict()`` is the exact position after the last item handed out: epoch, segment,
samples consumed in it and the byte offset of the next one, the shuffle buffer as sample
*locators* (shard, index, byte offset: re-read on resume, never stored as bytes), items
produced but not yet handed out, the processor's carry-over and the RNG. A resumed stream
seeks to the saved offset: its cost does not grow with the position in the epoch.

Faults (missing or truncated shard, undecodable sample) follow ``on_error``: ``raise``
stops with the shard and key, ``skip`` warns, counts (``counters``) and — for one-item-
per-sample processors — hands out a repeat of the last good sample instead, so every
rank still yields exactly its planned number of batches and no collective hangs.
"""
from __future__ import annotations

import logging
import random
from collections import deque
from typing import Any, Deque, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.plan import EpochPlan, Segment, Sources, epoch_plan, plan_from_sequence, resampled_draw
from framework.data.cache import ShardCache
from framework.data.sources import Shard, open_shard
from framework.data.tar import Sample, TarFormatError, iter_samples, skip_samples
from framework.errors import DataError, SampleError

log = logging.getLogger(__name__)
# read: samples read; skipped_*: faults under on_error=skip; repeated: handed out again to
# keep batches equal after faults; policy_dropped / policy_repeated: what data.remainder
# left out or padded in each epoch (counted once, by rank 0's first worker).
COUNTERS = ("read_samples", "skipped_samples", "skipped_shards", "repeated_samples", "policy_dropped", "policy_repeated")
_POSITION_KEYS = ("epoch", "draw", "segment", "consumed", "offset", "yielded")


class Processor(Protocol):
    """Turns one raw sample into a list of items (raising SampleError if it cannot).

    ``one_to_one`` processors give exactly one item per sample (images, audio): the stream
    then guarantees each reader's item count. Packing processors (text) give any number
    and may carry state across samples. A list, not a generator, so the carried state is
    final before any item is handed out (the rest wait in ``pending``)."""

    one_to_one: bool

    def __call__(self, key: str, sample: Sample, shard: str) -> List[Any]: ...

    def state_dict(self) -> Dict[str, Any]: ...

    def load_state_dict(self, state: Dict[str, Any]) -> None: ...


def _to_checkpointable(item: Any) -> Any:
    # Checkpoints are loaded with torch.load(weights_only=True): tensors pass, numpy does not.
    return torch.from_numpy(item) if isinstance(item, np.ndarray) else item


def _from_checkpointable(item: Any) -> Any:
    return item.numpy() if isinstance(item, torch.Tensor) else item


def _pack_items(items: Sequence[Any]) -> Any:
    """Items waiting in the stream, for its state: arrays of one shape and dtype (a text
    stream's token blocks, a vision stream's images) as one stacked tensor.

    A dataloader worker sends its state with every batch, and every tensor in it crosses to
    the main process as a shared-memory file descriptor with a connection of its own: a few
    hundred separate blocks cost ~80 ms a batch, one stacked tensor a fraction of a ms (and
    the message stays small: numpy would be pickled into the worker's pipe)."""
    first = items[0] if items else None
    if isinstance(first, np.ndarray) and all(
        isinstance(x, np.ndarray) and x.shape == first.shape and x.dtype == first.dtype for x in items
    ):
        return {"stacked": torch.from_numpy(np.stack(items))}
    return [_to_checkpointable(x) for x in items]


def _unpack_items(packed: Any) -> List[Any]:
    if isinstance(packed, dict):
        return list(packed["stacked"].numpy())
    return [_from_checkpointable(x) for x in packed]


Locator = Tuple[int, int, int]  # (shard number, sample index in the shard, byte offset)


class ShardStream(IterableDataset):
    def __init__(
        self,
        shards: List[Shard],
        processor: Processor,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        batch_size: int = 1,
        mode: str = "epoch",
        remainder: str = "drop",
        endless: bool = True,
        shuffle_buffer: int = 0,
        on_error: str = "skip",
        sources: Optional[Sources] = None,
        length: Optional[int] = None,
        cache: Optional[ShardCache] = None,
        zero_copy: bool = False,
    ) -> None:
        if not shards:
            raise DataError("no shards to stream")
        if mode == "epoch" and any(s.samples is None for s in shards):
            raise DataError("epoch mode needs each shard's sample count (from manifest.json or counted first)")
        if on_error not in ("skip", "raise"):
            raise DataError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.shards, self.processor = shards, processor
        self.counts = [s.samples for s in shards]
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        # Documents packed into blocks give no fixed item count: aligning them to batches
        # would only drop data, so packing processors split the epoch evenly instead.
        self.mode, self.endless = mode, endless
        self.remainder = remainder if processor.one_to_one else "none"
        self.shuffle_buffer, self.on_error, self.length = shuffle_buffer, on_error, length
        self.sources = sources or Sources(((0, len(shards)),), (1.0,))
        self.cache, self.zero_copy = cache, zero_copy
        self.elastic: Optional[Dict[str, Any]] = None  # set by the loader on a resume at another world size
        self._state: Dict[str, Any] = dict.fromkeys(_POSITION_KEYS, 0)
        self._counters: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._buffer: List[Tuple[Locator, str, Sample]] = []
        self._pending: Deque[Any] = deque()
        self._last_good: Optional[Locator] = None
        self._rng = random.Random()
        self._resume: Optional[Dict[str, Any]] = None
        self._started = False
        self._num_workers = 1

    def __len__(self) -> int:
        # See loader.ENDLESS_SAMPLES for why a training stream reports a length.
        if self.length is None:
            raise TypeError("this stream has no length")
        return self.length

    # -- plan -------------------------------------------------------------------------
    def plan(self, epoch: int, num_workers: int) -> EpochPlan:
        if self.elastic is not None and epoch == self.elastic["epoch"]:
            return plan_from_sequence(self.elastic["remaining"], self.world_size, num_workers, self.batch_size, self.remainder)
        return epoch_plan(self.counts, self.seed, epoch, self.world_size, num_workers, self.batch_size, self.remainder)

    def fingerprint(self, num_workers: int) -> Dict[str, Any]:
        """What a saved position is relative to: resuming needs the same values."""
        return {"world_size": self.world_size, "num_workers": num_workers, "batch_size": self.batch_size,
                "mode": self.mode, "remainder": self.remainder, "seed": self.seed, "num_shards": len(self.shards)}

    # -- resumable state --------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if not self._started:
            # Loaders snapshot a worker before it starts; there is no position yet.
            return {"started": False}
        return {
            "started": True,
            "fingerprint": self.fingerprint(self._num_workers),
            **self._state,
            "counters": dict(self._counters),
            "buffer": [locator for locator, _, _ in self._buffer],
            "pending": _pack_items(self._pending),
            "last_good": self._last_good,
            "processor": self.processor.state_dict(),
            "rng": self._rng.getstate(),
            # an elastic epoch's plan is not derivable from the seed: keep its sequence
            "elastic_sequence": [tuple(vars(s).values()) for s in self.elastic["remaining"]]
            if self.elastic and self.elastic["epoch"] == self._state["epoch"] else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resume = state if state.get("started") else None

    def _restore(self, state: Dict[str, Any], num_workers: int) -> None:
        if state["fingerprint"] != self.fingerprint(num_workers):
            raise DataError(
                f"the saved data position was made with {state['fingerprint']}, this run has "
                f"{self.fingerprint(num_workers)}; resume through the loader (elastic resume)"
            )
        self._state = {k: state[k] for k in _POSITION_KEYS}
        if state.get("elastic_sequence"):
            self.elastic = {"epoch": state["epoch"], "remaining": [Segment(*t) for t in state["elastic_sequence"]]}
        self._counters = dict(state["counters"])
        self._last_good = tuple(state["last_good"]) if state["last_good"] is not None else None
        self._pending = deque(_unpack_items(state["pending"]))
        self.processor.load_state_dict(state["processor"])
        self._rng.setstate(state["rng"])
        self._buffer = self._reread_all([tuple(locator) for locator in state["buffer"]])

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        return self.reader_items(*((info.id, info.num_workers) if info is not None else (0, 1)))

    def reader_items(self, worker: int, num_workers: int) -> Iterator[Any]:
        """The items of dataloader worker ``worker`` of ``num_workers`` on this rank
        (``__iter__`` inside a worker; ``data inspect`` and tests simulate any reader)."""
        self._num_workers = num_workers
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._restore(state, self._num_workers)
        else:
            self._rng.seed(hash((self.seed, self.rank, worker)))
            if self.elastic is not None:
                self._state["epoch"] = self.elastic["epoch"]
        self._started = True
        yield from self._drain_pending()  # items of samples read before a resume
        if self.mode == "resampled":
            yield from self._resampled(worker)
            return
        while True:
            yield from self._epoch(worker)
            self._state.update(epoch=self._state["epoch"] + 1, segment=0, consumed=0, offset=0, yielded=0)
            if not self.endless:
                return

    def _epoch(self, worker: int) -> Iterator[Any]:
        state = self._state
        plan = self.plan(state["epoch"], self._num_workers)
        reader = plan.reader(self.rank, worker)
        if self.rank == 0 and worker == 0 and state["segment"] == 0 and state["consumed"] == 0:
            self._counters["policy_dropped"] += plan.dropped
            self._counters["policy_repeated"] += plan.repeated
        quota = reader.samples if self.processor.one_to_one and self.remainder != "none" else None
        while state["segment"] < len(reader.segments):
            yield from self._read_segment(reader.segments[state["segment"]])
            state.update(segment=state["segment"] + 1, consumed=0, offset=0)
        while self._buffer:  # the epoch ends with its own samples: drain the buffer
            yield from self._emit(self._buffer.pop(self._rng.randrange(len(self._buffer))))
        yield from self._drain_pending(final=True)
        if quota is not None:
            while state["yielded"] < quota:  # faults cost samples: repeat one to keep batches equal
                yield from self._repeat_last_good()

    def _resampled(self, worker: int) -> Iterator[Any]:
        state = self._state
        while True:
            segment = resampled_draw(self.sources, self.counts, self.seed, self.rank, worker, state["draw"])
            yield from self._read_segment(segment)
            state.update(draw=state["draw"] + 1, consumed=0, offset=0)

    def _read_segment(self, segment: Segment) -> Iterator[Any]:
        for entry in self._segment_samples(segment):
            yield from self._shuffle(entry)

    def _segment_samples(self, segment: Segment) -> Iterator[Tuple[Locator, str, Sample]]:
        """Raw samples of a segment from the saved position on; read faults end the segment."""
        state = self._state
        url = self.shards[segment.shard].url
        bounded = segment.stop < (1 << 62)  # resampled draws of shards without counts are not
        try:
            with open_shard(url, state["offset"], self.cache, self.zero_copy) as stream:
                offset = state["offset"]
                if state["consumed"] == 0 and segment.start > 0:
                    offset = skip_samples(stream, segment.start, offset)  # headers only, no data read
                    state["offset"] = offset
                samples = iter_samples(stream, offset)
                while state["consumed"] < len(segment):
                    entry = next(samples, None)
                    if entry is None:
                        if bounded:
                            have = segment.start + state["consumed"]
                            self._fault(url, None, f"has {have} samples, its manifest says at least {segment.stop}", True, len(segment) - state["consumed"])
                        return
                    key, sample, next_offset = entry
                    locator = (segment.shard, segment.start + state["consumed"], offset)
                    state.update(consumed=state["consumed"] + 1, offset=next_offset)
                    offset = next_offset
                    self._counters["read_samples"] += 1
                    yield locator, key, sample
        except (TarFormatError, OSError) as exc:
            self._fault(url, None, f"unreadable: {exc}", True, len(segment) - state["consumed"] if bounded else 0)
        except DataError as exc:
            self._fault(url, None, str(exc), True, len(segment) - state["consumed"] if bounded else 0)

    def _shuffle(self, entry: Tuple[Locator, str, Sample]) -> Iterator[Any]:
        if self.shuffle_buffer <= 1:
            yield from self._emit(entry)
            return
        self._buffer.append(entry)
        if len(self._buffer) >= self.shuffle_buffer:
            index = self._rng.randrange(len(self._buffer))
            self._buffer[index], self._buffer[-1] = self._buffer[-1], self._buffer[index]
            yield from self._emit(self._buffer.pop())

    def _emit(self, entry: Tuple[Locator, str, Sample]) -> Iterator[Any]:
        locator, key, sample = entry
        url = self.shards[locator[0]].url
        try:
            items = self.processor(key, sample, url)
        except SampleError as exc:
            self._fault(url, key, str(exc))
            return
        if self.processor.one_to_one:
            self._last_good = locator
        self._pending.extend(items)
        yield from self._drain_pending()

    def _drain_pending(self, final: bool = False) -> Iterator[Any]:
        """Hand out produced items. A packing processor gives a document's blocks one after
        another; they are mixed here (``pending`` doubles as an item shuffle buffer), so a batch
        does not hold many blocks of one document."""
        mixing = not self.processor.one_to_one and self.shuffle_buffer > 1
        while self._pending and (final or not mixing or len(self._pending) >= self.shuffle_buffer):
            if mixing:
                index = self._rng.randrange(len(self._pending))
                self._pending[index], self._pending[-1] = self._pending[-1], self._pending[index]
                item = self._pending.pop()
            else:
                item = self._pending.popleft()
            self._state["yielded"] += 1
            yield item

    def _repeat_last_good(self) -> Iterator[Any]:
        if self._last_good is None:
            raise DataError(
                f"rank {self.rank}: no sample of its share of epoch {self._state['epoch']} could be read or decoded "
                f"(shards such as {self.shards[0].url}); see the warnings above"
            )
        self._counters["repeated_samples"] += 1
        locator, key, sample = self._reread(self._last_good)
        items = self.processor(key, sample, self.shards[locator[0]].url)
        self._state["yielded"] += 1
        yield items[0]

    def _reread_all(self, locators: List[Locator]) -> List[Tuple[Locator, str, Sample]]:
        """Re-read buffered samples: one open per shard, in offset order, any buffer order kept."""
        found: Dict[Locator, Tuple[Locator, str, Sample]] = {}
        by_shard: Dict[int, List[Locator]] = {}
        for locator in locators:
            by_shard.setdefault(locator[0], []).append(locator)
        for shard, wanted in by_shard.items():
            try:
                with open_shard(self.shards[shard].url, 0, self.cache, self.zero_copy) as stream:
                    for locator in sorted(wanted, key=lambda l: l[2]):
                        stream.seek(locator[2])
                        key, sample, _ = next(iter_samples(stream, locator[2]))
                        found[locator] = (locator, key, sample)
            except (OSError, ValueError):  # a stream that cannot seek: open at each offset
                for locator in wanted:
                    found[locator] = self._reread(locator)
        return [found[locator] for locator in locators]

    def _reread(self, locator: Locator) -> Tuple[Locator, str, Sample]:
        shard, _, offset = locator
        with open_shard(self.shards[shard].url, offset, self.cache, self.zero_copy) as stream:
            key, sample, _ = next(iter_samples(stream, offset))
        return locator, key, sample

    def _fault(self, url: str, key: Optional[str], reason: str, shard_failed: bool = False, lost: int = 0) -> None:
        where = f"shard {url}" + (f", sample {key}" if key else "")
        if self.on_error == "raise":
            raise DataError(f"{where}: {reason}")
        if shard_failed:
            self._counters["skipped_shards"] += 1
            self._counters["skipped_samples"] += lost
        else:
            self._counters["skipped_samples"] += 1
        log.warning("skipping %s: %s", where, reason)

    @property
    def counters(self) -> Dict[str, int]:
        return dict(self._counters)


def collate_arrays(items: List[Any]) -> torch.Tensor:
    """Stack same-shaped numpy items into one tensor (cheaper than default_collate)."""
    return torch.from_numpy(np.stack(items))
