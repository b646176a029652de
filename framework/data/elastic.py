"""Elastic resume: the rest of an epoch re-planned over another number of readers.

A checkpoint holds one data state per rank (``framework.training.checkpoint`` writes them as
files beside the weights; nothing is gathered on rank 0). Resuming on another world size (or
number of dataloader workers) turns the saved positions into the samples of the oldest epoch
in progress that no reader handed out, concatenated in old-reader order, and cuts that
sequence into the new readers' equal shares, as ``plan.split_sequence`` does. Items a reader
had produced but not handed out (packed text's blocks waiting in its mixing buffer, up to
``data.shuffle_buffer`` of them) belong to documents already read: they are not carried over,
and the resume says how many.

No rank reads every file. In two steps:

1. new rank r reads the old ranks r, r + W, r + 2W, ... (W new ranks: about one file each) and
   sums up each of their readers: started or not, its epoch and how many samples it has left;
   the summaries (four numbers a reader) are all-gathered;
2. from the counts alone every rank knows which stretch of the sequence is its share, and
   reads only the old ranks whose remainders fall in it (one or two).

``bench/scale.py`` times this for 4,096 -> 3,072 ranks x 8 workers from state files.
"""
from __future__ import annotations

import bisect
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

from framework.data.plan import EpochPlan, Segment, _reader_quotas, epoch_plan, plan_from_sequence

# (started, epoch or -1, samples left at that epoch or -1, items produced but not handed out):
# -1 where it depends on the oldest epoch
Summary = Tuple[bool, int, int, int]


class SavedLoaderStates(Protocol):
    """The data-loader states a checkpoint holds, one per old rank, read on demand."""

    world_size: int
    num_workers: int

    def loader_state(self, rank: int) -> Dict[str, Any]: ...


class GatheredStates:
    """Checkpoints written before per-rank files: every rank's loader state in one list."""

    def __init__(self, state: Dict[str, Any]) -> None:
        self.world_size, self.num_workers, self._ranks = state["world_size"], state["num_workers"], state["ranks"]

    def loader_state(self, rank: int) -> Dict[str, Any]:
        return self._ranks[rank]


def worker_dataset_states(loader_state: Dict[str, Any], num_workers: int) -> List[Optional[Dict[str, Any]]]:
    """The stream state of each dataloader worker inside a torchdata loader state."""
    if num_workers == 0:
        return [loader_state.get("dataset_state")]
    snapshots = loader_state["_snapshot"]["_worker_snapshots"]
    return [snapshots.get(f"worker_{w}", {}).get("dataset_state") for w in range(num_workers)]


def elastic_plan_state(segments: Sequence[Segment], batches: int, epoch: int) -> Dict[str, Any]:
    """What a reader saves of its own elastic plan (a later resume derives nothing else)."""
    return {"epoch": epoch, "segments": [(s.shard, s.start, s.stop) for s in segments], "batches": batches}


class _OldReaders:
    """Remainders of the old readers, from their saved states (each rank's file read once)."""

    def __init__(self, stream: Any, saved: SavedLoaderStates) -> None:
        self.stream, self.saved = stream, saved
        self.workers = max(saved.num_workers, 1)
        self._states: Dict[int, List[Optional[Dict[str, Any]]]] = {}
        self._seed_plans: Dict[int, Any] = {}

    def states(self, rank: int) -> List[Optional[Dict[str, Any]]]:
        if rank not in self._states:
            self._states[rank] = worker_dataset_states(self.saved.loader_state(rank), self.saved.num_workers)
        return self._states[rank]

    def seed_plan(self, epoch: int, fingerprint: Dict[str, Any]) -> EpochPlan:
        if epoch not in self._seed_plans:
            self._seed_plans[epoch] = epoch_plan(
                self.stream.counts, fingerprint["seed"], epoch, self.saved.world_size, self.workers,
                fingerprint["batch_size"], fingerprint["remainder"],
            )
        return self._seed_plans[epoch]

    def plan(self, reader: int, state: Optional[Dict[str, Any]], epoch: int) -> Tuple[Segment, ...]:
        """The reader's plan of ``epoch``: its own saved elastic plan, or the seeded one."""
        elastic = (state or {}).get("elastic")
        if elastic and elastic["epoch"] == epoch:
            return tuple(Segment(*t) for t in elastic["segments"])
        fingerprint = (state or {}).get("fingerprint") or self.stream.fingerprint(self.workers)
        return self.seed_plan(epoch, fingerprint).readers[reader].segments

    def remaining(self, reader: int, epoch: int) -> List[Segment]:
        """What old reader ``reader`` had not handed out of ``epoch``."""
        state = self.states(reader // self.workers)[reader % self.workers]
        if not state or not state.get("started"):
            return list(self.plan(reader, state, epoch))
        if state["epoch"] > epoch:
            return []  # this reader finished the epoch
        segments = self.plan(reader, state, epoch)
        index, consumed = state["segment"], state["consumed"]
        left: List[Segment] = []
        if index < len(segments):
            current = segments[index]
            left.append(Segment(current.shard, current.start + consumed, current.stop))
            left.extend(segments[index + 1 :])
        left.extend(Segment(shard, sample, sample + 1) for shard, sample, _ in state["buffer"])
        return [s for s in left if len(s) > 0]

    def summary(self, reader: int) -> Summary:
        state = self.states(reader // self.workers)[reader % self.workers]
        if state and state.get("started"):
            pending = state.get("pending")
            waiting = len(pending["origins"] if "origins" in pending else pending["stacked"]) if isinstance(pending, dict) else len(pending or ())
            return True, state["epoch"], sum(len(s) for s in self.remaining(reader, state["epoch"])), waiting
        elastic = (state or {}).get("elastic")
        if elastic:
            return False, elastic["epoch"], sum(stop - start for _, start, stop in elastic["segments"]), 0
        return False, -1, -1, 0


def summarize(stream: Any, saved: SavedLoaderStates, old_ranks: Iterable[int], readers: Optional[_OldReaders] = None) -> Dict[int, Summary]:
    """Step 1 for one new rank: the summaries of the old ranks it was given."""
    readers = readers or _OldReaders(stream, saved)
    return {rank * readers.workers + w: readers.summary(rank * readers.workers + w) for rank in old_ranks for w in range(readers.workers)}


def assign(
    stream: Any, saved: SavedLoaderStates, summaries: Dict[int, Summary], rank: int, world_size: int, num_workers: int,
    readers: Optional[_OldReaders] = None,
) -> Optional[Dict[str, Any]]:
    """Step 2: this rank's readers' shares of the epoch's rest, from every old reader's summary."""
    if stream.mode != "epoch":
        return None  # resampled streams have no epoch to complete: new draws continue
    readers = readers or _OldReaders(stream, saved)
    started = [s for s in summaries.values() if s[0]]
    if not started:
        return None
    epoch = min(s[1] for s in started)
    fingerprint = stream.fingerprint(readers.workers)
    counts = []
    for reader in range(len(summaries)):
        was_started, reader_epoch, left, _ = summaries[reader]
        if was_started:
            counts.append(left if reader_epoch == epoch else 0)
        elif reader_epoch == epoch:
            counts.append(left)
        else:
            counts.append(readers.seed_plan(epoch, fingerprint).readers[reader].samples)
    starts = [0]
    for count in counts:
        starts.append(starts[-1] + count)
    total = starts[-1]
    workers = max(num_workers, 1)
    quotas, batches = _reader_quotas(total, world_size, workers, stream.batch_size, stream.remainder)
    used = sum(quotas)
    cache: Dict[int, List[Segment]] = {}

    def stretch(lo: int, hi: int) -> List[Segment]:
        """Positions [lo, hi) of the concatenated remainders (lo < hi <= total)."""
        out: List[Segment] = []
        reader = bisect.bisect_right(starts, lo) - 1
        while lo < hi:
            while counts[reader] == 0:
                reader += 1
            if reader not in cache:
                cache[reader] = readers.remaining(reader, epoch)
            position = starts[reader]
            for segment in cache[reader]:
                if position + len(segment) <= lo:
                    position += len(segment)
                    continue
                first = segment.start + max(0, lo - position)
                last = min(segment.stop, segment.start + hi - position)
                out.append(Segment(segment.shard, first, last))
                lo = position + (last - segment.start)
                position += len(segment)
                if lo >= hi:
                    break
            reader += 1
        return out

    mine: Dict[int, Tuple[Tuple[Segment, ...], int]] = {}
    for worker in range(workers):
        index = rank * workers + worker
        lo = sum(quotas[:index])
        hi = lo + quotas[index]
        segments: List[Segment] = []
        while lo < hi and total > 0:  # policy pad runs past the end: wrap to the start
            start = lo % total
            take = min(hi - lo, total - start)
            segments += stretch(start, start + take)
            lo += take
        mine[worker] = (tuple(segments), batches[index])
    return {"epoch": epoch, "readers": mine, "dropped": max(0, total - used), "repeated": max(0, used - total),
            "waiting_dropped": sum(s[3] for s in summaries.values())}


def elastic_remainder(
    stream: Any, saved: SavedLoaderStates, rank: int, world_size: int, num_workers: int,
    gather: Callable[[Dict[int, Summary]], List[Dict[int, Summary]]] = lambda mine: [mine],
) -> Optional[Dict[str, Any]]:
    """Both steps for this rank (``gather``: all-gather of each rank's summaries)."""
    readers = _OldReaders(stream, saved)
    summaries: Dict[int, Summary] = {}
    for part in gather(summarize(stream, saved, range(rank, saved.world_size, world_size), readers)):
        summaries.update(part)
    if len(summaries) < saved.world_size * readers.workers:  # one process: read the rest here
        summaries.update(summarize(stream, saved, range(saved.world_size), readers))
    return assign(stream, saved, summaries, rank, world_size, num_workers, readers)


def legacy_elastic_sequence(state: Dict[str, Any], rank: int, worker: int) -> Tuple[Tuple[Segment, ...], int]:
    """A reader's elastic plan from a checkpoint of the gathered format (which saved the whole
    re-planned sequence in every reader's state)."""
    fingerprint = state["fingerprint"]
    plan = plan_from_sequence([Segment(*t) for t in state["elastic_sequence"]], fingerprint["world_size"],
                              fingerprint["num_workers"], fingerprint["batch_size"], fingerprint["remainder"])
    reader = plan.reader(rank, worker)
    return reader.segments, reader.batches
