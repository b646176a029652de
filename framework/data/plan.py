"""Who reads what: a pure function of (sample counts, seed, epoch, world, workers, batch).

Training, ``pretrain data inspect`` and the tests call these functions, so what is
inspected is exactly what is trained on.

Epoch mode: every rank computes the same shard permutation from (seed, epoch); the shards
in that order form one virtual sequence of N samples; readers (rank-major, then dataloader
worker) take consecutive ranges of it. Ranges are cut so that every rank gets exactly the
same number of full batches: ``drop`` leaves out the last N mod (world x batch) samples,
``pad`` repeats samples from the start of the sequence to fill the last batches, ``none``
(evaluation) splits all N samples as evenly as possible with no batch alignment. A range
may start inside a shard; the reader then skips tar headers up to it (no data is read).

Resampled mode: an endless sequence of draws; draw i of a reader picks a source by weight
and a shard of it uniformly, from an RNG seeded by (seed, rank, worker, i).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np

REMAINDER_POLICIES = ("drop", "pad", "none")


@dataclass(frozen=True)
class Segment:
    """Samples ``start`` (inclusive) to ``stop`` (exclusive) of shard number ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ReaderPlan:
    segments: Tuple[Segment, ...]
    batches: int  # full batches this reader contributes (0 under policy "none")

    @property
    def samples(self) -> int:
        return sum(len(s) for s in self.segments)


@dataclass(frozen=True)
class EpochPlan:
    readers: Tuple[ReaderPlan, ...]  # index: rank * num_workers + worker
    num_workers: int
    batches_per_rank: int
    total_samples: int
    dropped: int  # samples of the epoch no reader reads (policy drop)
    repeated: int  # samples read a second time (policy pad)

    def reader(self, rank: int, worker: int) -> ReaderPlan:
        return self.readers[rank * self.num_workers + worker]


def epoch_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    """The global shard order of an epoch: the same on every rank, new each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def _reader_quotas(total: int, world_size: int, num_workers: int, batch_size: int, remainder: str) -> Tuple[List[int], List[int]]:
    """(samples, batches) per reader, reader index = rank * num_workers + worker."""
    if remainder == "none":
        readers = world_size * num_workers
        return [total // readers + (r < total % readers) for r in range(readers)], [0] * readers
    per_rank = world_size * batch_size
    rank_batches = total // per_rank if remainder == "drop" else math.ceil(total / per_rank)
    batches = [rank_batches // num_workers + (w < rank_batches % num_workers) for _ in range(world_size) for w in range(num_workers)]
    return [b * batch_size for b in batches], batches


def split_sequence(
    sequence: Sequence[Segment], world_size: int, num_workers: int, batch_size: int, remainder: str
) -> Tuple[List[List[Segment]], List[int], int, int]:
    """Cut an ordered list of segments into consecutive per-reader ranges.
    Returns (segments per reader, batches per reader, dropped, repeated)."""
    if remainder not in REMAINDER_POLICIES:
        raise ValueError(f"remainder policy must be one of {REMAINDER_POLICIES}, not {remainder!r}")
    sequence = [s for s in sequence if len(s) > 0]
    total = sum(len(s) for s in sequence)
    quotas, batches = _reader_quotas(total, world_size, num_workers, batch_size, remainder)
    used = sum(quotas)
    plans: List[List[Segment]] = []
    index, taken = 0, 0  # position in `sequence`: segment index and samples taken of it
    for quota in quotas:
        segments: List[Segment] = []
        while quota > 0 and total > 0:
            if index == len(sequence):  # policy pad: wrap around to the start
                index, taken = 0, 0
            segment = sequence[index]
            take = min(quota, len(segment) - taken)
            segments.append(Segment(segment.shard, segment.start + taken, segment.start + taken + take))
            quota -= take
            taken += take
            if taken == len(segment):
                index, taken = index + 1, 0
        plans.append(segments)
    return plans, batches, max(0, total - used), max(0, used - total)


def epoch_plan(
    counts: Sequence[int], seed: int, epoch: int, world_size: int, num_workers: int, batch_size: int, remainder: str = "drop"
) -> EpochPlan:
    order = epoch_order(len(counts), seed, epoch)
    return plan_from_sequence([Segment(s, 0, counts[s]) for s in order], world_size, num_workers, batch_size, remainder)


def plan_from_sequence(
    sequence: Sequence[Segment], world_size: int, num_workers: int, batch_size: int, remainder: str
) -> EpochPlan:
    plans, batches, dropped, repeated = split_sequence(sequence, world_size, num_workers, batch_size, remainder)
    readers = tuple(ReaderPlan(tuple(p), b) for p, b in zip(plans, batches))
    return EpochPlan(
        readers=readers,
        num_workers=num_workers,
        batches_per_rank=sum(batches[:num_workers]),
        total_samples=sum(len(s) for s in sequence),
        dropped=dropped,
        repeated=repeated,
    )


@dataclass(frozen=True)
class Sources:
    """Shard index ranges of each source and its sampling weight (resampled mode)."""

    shard_ranges: Tuple[Tuple[int, int], ...]  # [first, last) shard index of each source
    weights: Tuple[float, ...] = field(default=())


def resampled_draw(sources: Sources, counts: Sequence[Optional[int]], seed: int, rank: int, worker: int, draw: int,
                   draw_samples: int = 0) -> Segment:
    """Draw number ``draw`` of a reader: a shard picked by source weight, whole, or a random
    stretch of ``draw_samples`` of it (shards with counts)."""
    rng = np.random.default_rng([seed, rank, worker, draw, 0x5EED])
    weights = np.asarray(sources.weights, dtype=np.float64)
    source = int(rng.choice(len(weights), p=weights / weights.sum()))
    first, last = sources.shard_ranges[source]
    shard = int(rng.integers(first, last))
    count = counts[shard]
    if count is None:
        return Segment(shard, 0, 1 << 62)
    if 0 < draw_samples < count:
        start = int(rng.integers(0, count - draw_samples + 1))
        return Segment(shard, start, start + draw_samples)
    return Segment(shard, 0, count)
