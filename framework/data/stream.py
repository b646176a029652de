"""A resumable stream of training items from shards (tar, or units of row files: Parquet, JSON
Lines), one per rank and dataloader worker.

What a reader reads comes from ``plan`` (epoch mode: a range of the epoch's shuffled
sample sequence; resampled mode: an endless series of weighted shard draws). Raw samples
pass a seeded shuffle buffer, then a modality-specific ``processor`` turns each into items.

``state_dict()`` is the exact position after the last item handed out: epoch, segment,
samples consumed in it and the byte offset of the next one, the shuffle buffer as sample
*locators* (shard, index, byte offset: re-read on resume, never stored as bytes), items
produced but not yet handed out (as origins re-derived on resume where the processor
``replays_items``, as a packer's token blocks do; otherwise stacked, integers in the
narrowest type that holds them), the processor's carry-over and the RNG. A resumed stream
seeks to the saved offset: its cost does not grow with the position in the epoch.

Faults (a missing, empty, truncated or malformed shard, an undecodable sample) follow
``on_error`` (framework/data/faults.py): ``raise`` stops with the shard and key, ``skip``
warns once, counts (``counters``) and — for one-item-per-sample processors — hands out a
repeat of the last good sample instead, so every rank still yields exactly its planned
number of batches and no collective hangs. Shards that planning found bad (``Shard.fault``)
are counted once per epoch, by rank 0's first worker.
"""
from __future__ import annotations

import random
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterator, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from framework.data.elastic import elastic_plan_state, legacy_elastic_sequence
from framework.data.plan import EpochPlan, ReaderPlan, Segment, Sources, epoch_plan, resampled_draw
from framework.data.cache import ShardCache
from framework.data.faults import ON_ERROR, report_fault
from framework.data.sources import Shard, open_reader
from framework.data.tar import Sample, TarFormatError
from framework.errors import DataError, SampleError, SampleFiltered

# read: samples read; skipped_*: faults under on_error=skip (skipped_shards includes those
# planning found bad); repeated: handed out again to keep batches equal after faults;
# policy_dropped / policy_repeated: what data.remainder left out or padded in each epoch
# (counted once, by rank 0's first worker); filtered: left out by a processor's rule
# (SampleFiltered: a clip below data.min_seconds), replaced like faults to keep batches equal.
COUNTERS = ("read_samples", "skipped_samples", "skipped_shards", "repeated_samples", "policy_dropped", "policy_repeated",
            "filtered_samples")
_POSITION_KEYS = ("epoch", "draw", "segment", "consumed", "offset", "yielded")
# Resampled mode draws forever: this many draws in a row without one usable sample is an error.
_MAX_BARREN_DRAWS = 1000


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
        stacked = np.stack(items)
        if stacked.dtype.kind in "iu" and stacked.itemsize > 2 and stacked.size and 0 <= stacked.min() and stacked.max() < 1 << 16:
            # token ids of a vocabulary below 65,536: a quarter of int64's bytes
            return {"stacked": torch.from_numpy(stacked.astype(np.uint16)), "dtype": str(stacked.dtype)}
        return {"stacked": torch.from_numpy(stacked)}
    return [_to_checkpointable(x) for x in items]


def _unpack_items(packed: Any) -> List[Any]:
    if isinstance(packed, dict):
        stacked = packed["stacked"].numpy()
        return list(stacked.astype(packed["dtype"]) if "dtype" in packed else stacked)
    return [_from_checkpointable(x) for x in packed]


Locator = Tuple[int, int, int]  # (shard number, sample index in the shard, byte offset)


class ReplayableRandom:
    """The shuffle's uniform draws, with a state of two numbers: the seed and the draws since.

    A stream's state is taken with every batch, and ``random.Random``'s is 625 numbers (9 us
    to copy: a third of a microsecond per 1 KB text sample). Here a snapshot is free and a
    restore replays the draws since the last ``reseed``; the stream reseeds at every segment
    (a shard or part of one), so that is at most a few thousand draws."""

    def __init__(self) -> None:
        self.generator = random.Random()
        self.seed_value, self.draws = 0, 0

    def reseed(self, *key: int) -> None:
        self.seed_value, self.draws = hash(key), 0
        self.generator.seed(self.seed_value)

    def pick(self, n: int) -> int:
        """A uniform index below ``n`` (random() * n: randrange costs 5x as much)."""
        self.draws += 1
        return int(self.generator.random() * n)

    def state(self) -> Tuple[int, int]:
        return self.seed_value, self.draws

    def restore(self, state: Tuple[int, int]) -> None:
        self.seed_value, draws = state
        self.generator.seed(self.seed_value)
        for _ in range(draws):
            self.generator.random()
        self.draws = draws


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
        bucket: Optional[Callable[[Sample], float]] = None,
        draw_samples: int = 0,
    ) -> None:
        """``bucket`` (one-item-per-sample processors, a shuffle buffer of at least a batch):
        a raw sample's length (an audio clip's duration); each batch is then drawn from the
        buffer as a random sample and the batch_size - 1 buffered samples nearest to it in
        length, so a batch is not mostly padding. Deterministic and resumable like the shuffle."""
        if not shards:
            raise DataError("no shards to stream")
        if mode == "epoch" and any(s.samples is None for s in shards):
            raise DataError("epoch mode needs each shard's sample count (from manifest.json or counted first)")
        if on_error not in ON_ERROR:
            raise DataError(f"on_error must be 'skip' or 'raise', not {on_error!r}")
        self.shards, self.processor = shards, processor
        self.counts = [s.samples for s in shards]
        self._urls = [s.url for s in shards]
        self.planning_faults = sum(s.fault is not None for s in shards)
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        # Documents packed into blocks give no fixed item count: aligning them to batches
        # would only drop data, so packing processors split the epoch evenly instead.
        self.mode, self.endless = mode, endless
        self.remainder = remainder if processor.one_to_one else "none"
        self.shuffle_buffer, self.on_error, self.length = shuffle_buffer, on_error, length
        self.sources = sources or Sources(((0, len(shards)),), (1.0,))
        self.cache, self.zero_copy = cache, zero_copy
        if bucket is not None and not (processor.one_to_one and shuffle_buffer >= batch_size > 1):
            raise DataError("length bucketing needs a one-item-per-sample processor and data.shuffle_buffer >= data.batch_size > 1")
        self.bucket = bucket
        self.draw_samples = draw_samples  # resampled mode: samples per draw (0: whole shards)
        self.elastic: Optional[Dict[str, Any]] = None  # set by the loader on a resume at another world size
        self._state: Dict[str, Any] = dict.fromkeys(_POSITION_KEYS, 0)
        self._counters: Dict[str, int] = dict.fromkeys(COUNTERS, 0)
        # The shuffle buffer: raw samples and, in step, where each was read (its state is the
        # locators alone, copied with every batch: a second list keeps that copy a C loop).
        self._buffer: List[Tuple[str, Sample]] = []
        self._buffer_locators: List[Locator] = []
        self._buffer_lengths: List[float] = []  # with bucket: each buffered sample's length
        self._pending: Deque[Any] = deque()
        # A replaying processor's waiting items are checkpointed by origin (kept in step with pending).
        self._replay = bool(getattr(processor, "replays_items", False)) and not processor.one_to_one
        self._origins: Deque[Any] = deque()
        self._documents_limit = 4096  # the replaying processor's document table is pruned past this
        self._last_good: Optional[Locator] = None
        self._rng = ReplayableRandom()
        self._worker = 0
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
        """The seeded plan of an epoch (every reader's share)."""
        return epoch_plan(self.counts, self.seed, epoch, self.world_size, num_workers, self.batch_size, self.remainder)

    def _reader_plan(self, epoch: int, worker: int) -> Tuple[ReaderPlan, int, int]:
        """(this reader's share of ``epoch``, samples the policy dropped, repeated): the
        elastic re-plan of the epoch a resume on other readers fell in, or the seeded one."""
        if self.elastic is not None and epoch == self.elastic["epoch"]:
            segments, batches = self.elastic["readers"][worker]
            return ReaderPlan(tuple(segments), batches), self.elastic["dropped"], self.elastic["repeated"]
        plan = self.plan(epoch, self._num_workers)
        return plan.reader(self.rank, worker), plan.dropped, plan.repeated

    def _elastic_state(self, worker: int) -> Optional[Dict[str, Any]]:
        if self.elastic is None or self.elastic["epoch"] != self._state["epoch"]:
            return None
        segments, batches = self.elastic["readers"][worker]
        return elastic_plan_state(segments, batches, self.elastic["epoch"])

    def fingerprint(self, num_workers: int) -> Dict[str, Any]:
        """What a saved position is relative to: resuming needs the same values."""
        return {"world_size": self.world_size, "num_workers": num_workers, "batch_size": self.batch_size,
                "mode": self.mode, "remainder": self.remainder, "seed": self.seed, "num_shards": len(self.shards),
                **({"draw_samples": self.draw_samples} if self.draw_samples else {})}

    # -- resumable state --------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        if not self._started:
            # Loaders snapshot a worker before it starts; there is no position yet (but an
            # elastic plan, which a later resume could not derive).
            if self.elastic is None:
                return {"started": False}
            info = get_worker_info()
            segments, batches = self.elastic["readers"][info.id if info is not None else 0]
            return {"started": False, "elastic": elastic_plan_state(segments, batches, self.elastic["epoch"])}
        return {
            "started": True,
            "fingerprint": self.fingerprint(self._num_workers),
            **self._state,
            "counters": dict(self._counters),
            "buffer": list(self._buffer_locators),
            "pending": self._pending_state(),
            "last_good": self._last_good,
            "processor": self.processor.state_dict(),
            "rng": self._rng.state(),
            # an elastic epoch's plan is not derivable from the seed: each reader keeps its own
            "elastic": self._elastic_state(self._worker),
        }

    def _pending_state(self) -> Any:
        if not self._replay:
            return _pack_items(self._pending)
        self._forget_documents()
        return {"origins": torch.tensor(list(self._origins), dtype=torch.int64).reshape(-1, 2)}

    def _forget_documents(self) -> None:
        """Drop the replaying processor's locators of documents no waiting item needs."""
        oldest = self.processor.oldest_needed()
        if self._origins:
            oldest = min(oldest, min(number for number, _ in self._origins))
        self.processor.documents.forget_before(oldest)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._resume = state if state.get("started") else None

    def _restore(self, state: Dict[str, Any], num_workers: int) -> None:
        if state["fingerprint"] != self.fingerprint(num_workers):
            raise DataError(
                f"the saved data position was made with {state['fingerprint']}, this run has "
                f"{self.fingerprint(num_workers)}; resume through the loader (elastic resume)"
            )
        self._state = {k: state[k] for k in _POSITION_KEYS}
        plan = None
        if state.get("elastic"):
            plan = tuple(Segment(*t) for t in state["elastic"]["segments"]), state["elastic"]["batches"]
        elif state.get("elastic_sequence"):  # the gathered format's checkpoints
            plan = legacy_elastic_sequence(state, self.rank, self._worker)
        if plan is not None:  # its policy counts were taken when the elastic epoch began
            self.elastic = {"epoch": state["epoch"], "readers": {self._worker: plan}, "dropped": 0, "repeated": 0}
        self._counters = dict(state["counters"])
        self._last_good = tuple(state["last_good"]) if state["last_good"] is not None else None
        self.processor.load_state_dict(state["processor"])
        pending = state["pending"]
        if isinstance(pending, dict) and "origins" in pending:
            origins = [tuple(o) for o in pending["origins"].tolist()]
            blocks = self.processor.rebuild(origins, self._reread_all)  # unreadable ones were counted as faults
            kept = [i for i, block in enumerate(blocks) if block is not None]
            self._pending, self._origins = deque(blocks[i] for i in kept), deque(origins[i] for i in kept)
        else:
            self._pending = deque(_unpack_items(pending))
        self._rng.restore(state["rng"])
        entries = self._reread_all([tuple(locator) for locator in state["buffer"]])
        self._buffer_locators = [locator for locator, _, _ in entries]
        self._buffer = [(key, sample) for _, key, sample in entries]
        self._buffer_lengths = [self.bucket(sample) for _, _, sample in entries] if self.bucket else []

    # -- iteration --------------------------------------------------------------------
    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        return self.reader_items(*((info.id, info.num_workers) if info is not None else (0, 1)))

    def reader_items(self, worker: int, num_workers: int) -> Iterator[Any]:
        """The items of dataloader worker ``worker`` of ``num_workers`` on this rank
        (``__iter__`` inside a worker; ``data inspect`` and tests simulate any reader)."""
        self._num_workers, self._worker = num_workers, worker
        if self._resume is not None:
            state, self._resume = self._resume, None
            self._restore(state, self._num_workers)
        else:
            self._rng.reseed(self.seed, self.rank, worker)
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
        reader, dropped, repeated = self._reader_plan(state["epoch"], worker)
        if self.rank == 0 and worker == 0 and state["segment"] == 0 and state["consumed"] == 0:
            self._counters["policy_dropped"] += dropped
            self._counters["policy_repeated"] += repeated
            self._counters["skipped_shards"] += self.planning_faults
        quota = reader.samples if self.processor.one_to_one and self.remainder != "none" else None
        while state["segment"] < len(reader.segments):
            yield from self._read_segment(reader.segments[state["segment"]])
            state.update(segment=state["segment"] + 1, consumed=0, offset=0)
        while self._buffer and self.bucket is not None:  # the epoch ends with its own samples
            yield from self._emit_bucket()
        while self._buffer:  # the epoch ends with its own samples: drain the buffer
            index = self._rng.pick(len(self._buffer))
            key, sample = self._buffer.pop(index)
            yield from self._hand_out(self._process(self._buffer_locators.pop(index), key, sample))
        yield from self._drain_pending(final=True)
        if quota is not None:
            while state["yielded"] < quota:  # faults cost samples: repeat one to keep batches equal
                yield from self._repeat_last_good()

    def _resampled(self, worker: int) -> Iterator[Any]:
        state = self._state
        barren = 0  # draws in a row that gave nothing: all-bad data must not spin forever
        while True:
            segment = resampled_draw(self.sources, self.counts, self.seed, self.rank, worker, state["draw"], self.draw_samples)
            yielded = state["yielded"]
            yield from self._read_segment(segment)
            state.update(draw=state["draw"] + 1, consumed=0, offset=0)
            barren = barren + 1 if state["yielded"] == yielded else 0
            if barren >= _MAX_BARREN_DRAWS:
                raise DataError(
                    f"rank {self.rank}: {barren} shard draws in a row gave no usable sample (the last: "
                    f"{self.shards[segment.shard].url}); see the warnings above"
                )

    def _read_segment(self, segment: Segment) -> Iterator[Any]:
        """A segment's samples, from the saved position on, through the shuffle buffer and the
        processor, handed out. The hot path of every stream: one loop, no generator per sample.
        A read fault ends the segment (counted with the samples it costs, or raised)."""
        state, counters, pending, rng = self._state, self._counters, self._pending, self._rng
        buffer, locators, size, random = self._buffer, self._buffer_locators, self.shuffle_buffer, rng.generator.random
        if state["consumed"] == 0:  # a fresh segment (a resume inside one restored the draws)
            rng.reseed(self.seed, self.rank, self._worker, state["epoch"], state["segment"], state["draw"])
        processor, one_to_one, urls, replay = self.processor, self.processor.one_to_one, self._urls, self._replay
        direct = one_to_one or size <= 1  # items go out in order: no mixing in pending
        bucket = self.bucket
        shard, first = segment.shard, segment.start
        url = urls[shard]
        bounded = segment.stop < (1 << 62)  # resampled draws of shards without counts are not
        remaining = len(segment) - state["consumed"]
        failure = None
        try:
            stream = open_reader(self.shards[shard], state["offset"], self.cache, self.zero_copy)
        except (TarFormatError, OSError) as exc:
            self._fault(url, None, f"unreadable: {exc}", remaining if bounded else 0, shard=segment.start == 0)
            return
        # A shard read by several readers counts once in skipped_shards: by the reader whose range
        # holds the damage (a fault while skipping to one's range lies in an earlier reader's).
        own_range = segment.start == 0 or state["consumed"] > 0
        with stream:
            offset = state["offset"]
            reading = True  # an exception while reading is a fault of the shard; while processing, not
            try:
                if state["consumed"] == 0 and segment.start > 0:
                    offset = state["offset"] = stream.skip(segment.start, offset)  # tar: headers only
                    own_range = True
                samples = stream.samples(offset)
                for key, sample, next_offset in samples if remaining > 0 else ():
                    reading = False
                    locator = (shard, first + state["consumed"], offset)
                    state["consumed"] += 1
                    state["offset"] = offset = next_offset
                    counters["read_samples"] += 1
                    remaining -= 1
                    if size > 1:
                        buffer.append((key, sample))
                        locators.append(locator)
                        if bucket is not None:
                            self._buffer_lengths.append(bucket(sample))
                        if len(buffer) < size:
                            reading = True
                            if remaining:
                                continue
                            break
                        if bucket is not None:  # a whole batch of similar lengths at once
                            yield from self._emit_bucket()
                            reading = True
                            if remaining:
                                continue
                            break
                        # A uniform pick (rng.pick, inline), swapped with the last and popped: O(1).
                        rng.draws += 1
                        index = int(random() * len(buffer))
                        buffer[index], buffer[-1] = buffer[-1], buffer[index]
                        locators[index], locators[-1] = locators[-1], locators[index]
                        key, sample = buffer.pop()
                        locator = locators.pop()
                    try:  # _process, inline: once per sample
                        if replay:
                            processor.source = locator
                        items = processor(key, sample, urls[locator[0]])
                    except SampleError as exc:
                        self._fault(urls[locator[0]], key, str(exc))
                        items = ()
                    except SampleFiltered:
                        counters["filtered_samples"] += 1
                        items = ()
                    else:
                        if one_to_one:
                            self._last_good = locator
                    if direct and not pending and len(items) == 1:
                        state["yielded"] += 1
                        yield items[0]
                    elif items:
                        yield from self._hand_out(items)
                    reading = True
                    if not remaining:
                        break
            except (TarFormatError, OSError) as exc:
                if not reading:
                    raise
                failure = f"unreadable: {exc}"
            if remaining > 0 and bounded and failure is None:
                failure = f"has {segment.start + state['consumed']} samples, its manifest says at least {segment.stop}"
            elif remaining == 0:
                if failure is None and segment.stop == self.counts[segment.shard]:
                    try:
                        extra = next(samples, None)
                    except (TarFormatError, OSError):
                        extra = None  # damage after the last counted sample costs no sample
                    if extra is not None:
                        # More samples than counted (a stale manifest, or a name damaged where tar
                        # has no checksum, splitting a sample): free to check, the reader is at the end.
                        remaining, failure = 1, f"has more samples than its manifest's {segment.stop}; the rest are not read"
        if failure is not None:
            self._fault(url, None, failure, remaining if bounded else 0, shard=own_range)

    def _emit_bucket(self) -> Iterator[Any]:
        """One batch from the buffer: a random sample and the batch_size - 1 nearest in length.
        A sample that fails (or is filtered) is replaced by a repeat of a good one of the same
        batch, so batches stay aligned with the bucket's boundaries."""
        buffer, locators, lengths = self._buffer, self._buffer_locators, self._buffer_lengths
        anchor = lengths[self._rng.pick(len(buffer))]
        chosen = sorted(sorted(range(len(buffer)), key=lambda i: (abs(lengths[i] - anchor), i))[: self.batch_size], reverse=True)
        group = [(locators[i], *buffer[i]) for i in chosen]
        for i in chosen:  # descending: each pop leaves the lower indices in place
            buffer.pop(i), locators.pop(i), lengths.pop(i)
        items = [item for entry in group for item in self._process(*entry)]
        if items and len(items) < len(group):
            self._counters["repeated_samples"] += len(group) - len(items)
            items += [items[i % len(items)] for i in range(len(group) - len(items))]
        self._state["yielded"] += len(items)
        yield from items

    def _process(self, locator: Locator, key: str, sample: Sample) -> List[Any]:
        """The processor's items for a sample; none (counted, or raised) when it cannot decode it."""
        try:
            if self._replay:
                self.processor.source = locator
            items = self.processor(key, sample, self.shards[locator[0]].url)
        except SampleError as exc:
            self._fault(self.shards[locator[0]].url, key, str(exc))
            return []
        except SampleFiltered:
            self._counters["filtered_samples"] += 1
            return []
        if self.processor.one_to_one:
            self._last_good = locator
        return items

    def _hand_out(self, items: List[Any]) -> Iterator[Any]:
        """Items of the last processor call, through ``pending``."""
        self._pending.extend(items)
        if self._replay:
            self._origins.extend(self.processor.last_origins)
            if len(self.processor.documents) > self._documents_limit:
                self._forget_documents()
                self._documents_limit = max(4096, 2 * len(self.processor.documents))
        yield from self._drain_pending()

    def _drain_pending(self, final: bool = False) -> Iterator[Any]:
        """Hand out produced items. A packing processor gives a document's blocks one after
        another; they are mixed here (``pending`` doubles as an item shuffle buffer), so a batch
        does not hold many blocks of one document."""
        mixing = not self.processor.one_to_one and self.shuffle_buffer > 1
        pending, origins, replay = self._pending, self._origins, self._replay
        while pending and (final or not mixing or len(pending) >= self.shuffle_buffer):
            if mixing:
                index = self._rng.pick(len(pending))
                pending[index], pending[-1] = pending[-1], pending[index]
                item = pending.pop()
                if replay:
                    origins[index], origins[-1] = origins[-1], origins[index]
                    origins.pop()
            else:
                item = pending.popleft()
                if replay:
                    origins.popleft()
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
        """Re-read buffered samples: one open per shard, in offset order, any buffer order kept.
        A sample that cannot be read again (its shard changed since the checkpoint) is a fault."""
        found: Dict[Locator, Tuple[Locator, str, Sample]] = {}
        by_shard: Dict[int, List[Locator]] = {}
        for locator in locators:
            by_shard.setdefault(locator[0], []).append(locator)
        for shard, wanted in by_shard.items():
            url = self.shards[shard].url
            try:
                with open_reader(self.shards[shard], 0, self.cache, self.zero_copy) as stream:
                    for locator in sorted(wanted, key=lambda l: l[2]):
                        try:
                            stream.seek(locator[2])
                        except (OSError, ValueError):  # a stream that cannot seek: open at each offset
                            found.update((l, self._reread(l)) for l in wanted if l not in found)
                            break
                        found[locator] = self._sample_at(stream, locator)
            except (TarFormatError, OSError, DataError, StopIteration) as exc:
                lost = [l for l in wanted if l not in found]
                self._fault(url, None, f"cannot re-read {len(lost)} buffered sample(s) saved in the checkpoint: {exc or 'no sample there'}", len(lost), shard=True)
        return [found[locator] for locator in locators if locator in found]

    def _reread(self, locator: Locator) -> Tuple[Locator, str, Sample]:
        with open_reader(self.shards[locator[0]], locator[2], self.cache, self.zero_copy) as stream:
            return self._sample_at(stream, locator)

    @staticmethod
    def _sample_at(stream: Any, locator: Locator) -> Tuple[Locator, str, Sample]:
        key, sample, _ = next(stream.samples(locator[2]))
        return locator, key, sample

    def _fault(self, url: str, key: Optional[str], reason: str, lost: int = 1, shard: bool = False) -> None:
        """Raise, or count ``lost`` samples (and the shard, once per damage) and warn once."""
        report_fault(f"shard {url}" + (f", sample {key}" if key else ""), reason, self.on_error)
        self._counters["skipped_shards"] += shard
        self._counters["skipped_samples"] += lost

    @property
    def counters(self) -> Dict[str, int]:
        return dict(self._counters)


def collate_arrays(items: List[Any]) -> torch.Tensor:
    """Stack same-shaped numpy items into one tensor (cheaper than default_collate)."""
    return torch.from_numpy(np.stack(items))
