"""``pretrain data inspect``: what a run would read, before GPU-hours are spent on it.

It uses the very functions training uses (``resolve_sources``, ``epoch_plan``) for any
world size and worker count, simulated in one process with no process group. With
``verify`` it reads every sample once, decodes it with the objective's own processor, and
checks that the plan covers every key exactly once, up to what the remainder policy drops
or repeats. Bad shards and samples follow ``data.on_error`` as in training: ``skip`` names
each on its own line and counts it in ``bad=``; ``raise`` stops at the first.

Coverage is proven by interval arithmetic over the plan's segments (sorted per shard, their
union and overlaps), never per sample, so a plan of 10^9 samples over 4,096 ranks x 8 workers
checks in seconds and little memory; ranks are summarised as min/max (``per_rank`` lists each).
"""
from __future__ import annotations

import collections

import numpy as np
from typing import Any, Callable, Dict, List, Optional, Tuple

from rich.progress import Progress

from framework.data.plan import epoch_plan
from framework.data.faults import report_fault
from framework.data.sources import Shard, check_shards, open_reader, resolve_sources
from framework.data.stream import Processor
from framework.data.tar import TarFormatError
from framework.errors import DataError, SampleError


def _scan_shard(number: int, shard: Shard, processor: Optional[Processor], zero_copy: bool,
                on_error: str) -> Tuple[int, List[str], List[str], Optional[List[int]]]:
    """Read one shard: (its number, sample keys in order, problems by name, tokens per sample
    when the processor packs text, else None). Runs in a ``--jobs`` worker or in-process."""
    keys: List[str] = []
    problems: List[str] = []
    count_tokens = getattr(processor, "count_tokens", None)
    tokens: Optional[List[int]] = [] if count_tokens is not None else None

    def problem(kind: str, where: str, reason: str) -> None:
        report_fault(where, reason, on_error, announce=False)  # raise stops here; skip lists them all below
        problems.append(f"{kind}: {where.split(' ', 1)[1]}: {reason}")

    shard_bad = False
    try:
        with open_reader(shard, zero_copy=zero_copy) as stream:
            for key, sample, _ in stream.samples(0):
                keys.append(key)
                if processor is None:
                    continue
                try:
                    if tokens is not None:  # packing is order-dependent: count the document's tokens instead
                        tokens.append(count_tokens(sample))
                    else:
                        processor(key, sample, shard.url)
                except SampleError as exc:
                    problem("bad sample", f"shard {shard.url}, sample {key}", str(exc))
                    if tokens is not None:
                        tokens.append(0)
    except (TarFormatError, OSError, DataError) as exc:
        shard_bad = True
        if shard.fault is None:  # else planning named it already
            problem("bad shard", f"shard {shard.url}", f"{exc} (after {len(keys)} sound samples)")
    if not shard_bad and shard.samples is not None and len(keys) < shard.samples:
        problem("bad shard", f"shard {shard.url}", f"has {len(keys)} samples, its manifest says {shard.samples}")
    return number, keys, problems, tokens


def scan_shards(shards: List[Shard], processor: Optional[Processor], report: Callable[[str], None], zero_copy: bool = False,
                on_error: str = "skip", jobs: int = 1) -> Tuple[Dict[Tuple[int, int], str], List[str], Dict[int, List[int]]]:
    """Read every sample, over ``jobs`` processes: ({(shard, index): key}, [problems by name, in
    shard order], {shard: tokens per sample} for packed text). Read-only: an interrupted
    verification is restarted, not resumed."""
    results: Dict[int, tuple] = {}
    with Progress(transient=True) as progress:
        task = progress.add_task("verifying shards", total=len(shards))
        if jobs <= 1:
            for number, shard in enumerate(shards):
                results[number] = _scan_shard(number, shard, processor, zero_copy, on_error)
                progress.advance(task)
        else:
            from concurrent.futures import ProcessPoolExecutor, as_completed

            from framework.data.writers.parallel import mp_context

            with ProcessPoolExecutor(jobs, mp_context=mp_context()) as pool:
                futures = [pool.submit(_scan_shard, number, shard, processor, zero_copy, on_error)
                           for number, shard in enumerate(shards)]
                for future in as_completed(futures):
                    number, *rest = future.result()  # under raise, the first fault stops here
                    results[number] = (number, *rest)
                    progress.advance(task)
    keys: Dict[Tuple[int, int], str] = {}
    problems: List[str] = []
    tokens: Dict[int, List[int]] = {}
    for number in sorted(results):
        _, shard_keys, shard_problems, shard_tokens = results[number]
        keys.update(((number, index), key) for index, key in enumerate(shard_keys))
        problems += shard_problems
        if shard_tokens is not None:
            tokens[number] = shard_tokens
    for line in problems:
        report(line)
    return keys, problems, tokens


def inspect_data(
    spec: Any,
    *,
    seed: int,
    batch_size: int,
    remainder: str,
    world_size: int,
    num_workers: int,
    epochs: int = 1,
    processor: Optional[Processor] = None,
    zero_copy: bool = False,
    verify: bool = False,
    on_error: str = "skip",
    report: Callable[[str], None] = print,
    per_rank: bool = False,
    jobs: int = 1,
    fields: Any = None,
) -> Dict[str, Any]:
    """``fields``: how row files' columns become samples (the objective's data module's; by
    default whichever of text, image and audio a file has)."""
    shards, ranges, weights = resolve_sources(spec, "data.train", fields)
    shards = check_shards(shards, on_error, announce=False)  # the planning training does; its faults are listed below
    readers = max(num_workers, 1)
    if processor is not None and not processor.one_to_one:
        remainder = "none"  # packed text: documents are split evenly, see ShardStream
    report(f"sources: {len(ranges)}; shards: {len(shards)}; samples: {sum(s.samples for s in shards)}")
    for (first, last), weight in zip(ranges, weights):
        report(f"  source shards {first}..{last - 1}: {sum(s.samples for s in shards[first:last])} samples, weight {weight}")
    planning = [f"bad shard: {s.url}: {s.fault} (found while counting its samples)" for s in shards if s.fault]
    for line in planning:
        report(line)
    keys, problems, tokens = scan_shards(shards, processor, report, zero_copy, on_error, jobs) if verify else ({}, [], {})
    problems = planning + problems
    summary: Dict[str, Any] = {}
    for epoch in range(epochs):
        plan = epoch_plan([s.samples for s in shards], seed, epoch, world_size, readers, batch_size, remainder)
        report(f"epoch {epoch}: {world_size} rank(s) x {readers} worker(s), batch {batch_size}, remainder {remainder}")
        packed = remainder == "none"  # packed text: batches depend on tokenization
        if per_rank:
            for rank in range(world_size):
                parts = [
                    f"worker {w}: " + ("" if packed else f"{plan.reader(rank, w).batches} batches, ")
                    + f"{plan.reader(rank, w).samples} samples in {len(plan.reader(rank, w).segments)} segment(s)"
                    for w in range(readers)
                ]
                head = "documents split evenly" if packed else f"{sum(plan.reader(rank, w).batches for w in range(readers))} batches"
                report(f"  rank {rank}: {head}  |  " + "  |  ".join(parts))
        rank_samples = [sum(plan.reader(r, w).samples for w in range(readers)) for r in range(world_size)]
        rank_batches = [sum(plan.reader(r, w).batches for w in range(readers)) for r in range(world_size)]
        report(f"  samples per rank: {min(rank_samples)}..{max(rank_samples)}"
               + ("" if packed else f"; batches per rank: {min(rank_batches)}..{max(rank_batches)}")
               + ("" if per_rank else " (--per-rank lists each rank and worker)"))
        planned, unique = coverage(plan)
        total = sum(s.samples for s in shards)
        summary = {
            "samples": total,
            "planned": planned,
            "unique": unique,
            "duplicates": planned - unique - plan.repeated,
            "missing": total - unique - plan.dropped,
            "dropped": plan.dropped,
            "repeated": plan.repeated,
            "bad": len(problems),
            "batches_per_rank": rank_batches,
        }
        if verify:
            summary["duplicate_keys"] = duplicate_keys(plan, keys, [s.samples for s in shards]) - plan.repeated
        if tokens:  # packed text: what the tokenizer makes of each rank's documents
            block = getattr(processor, "block_len", 1)
            per_reader = [sum(sum(tokens.get(s.shard, [])[s.start:s.stop]) for s in reader.segments) for reader in plan.readers]
            rank_tokens = [sum(per_reader[r * readers:(r + 1) * readers]) for r in range(world_size)]
            rank_blocks = [sum(t // block for t in per_reader[r * readers:(r + 1) * readers]) for r in range(world_size)]
            rank_batches = [sum(t // block // batch_size for t in per_reader[r * readers:(r + 1) * readers])
                            for r in range(world_size)]
            report(f"  packed text, epoch {epoch}: tokens per rank {min(rank_tokens)}..{max(rank_tokens)}; blocks of {block} "
                   f"per rank {min(rank_blocks)}..{max(rank_blocks)}; full batches per rank {min(rank_batches)}..{max(rank_batches)}")
            summary.update(tokens=sum(rank_tokens), blocks_per_rank=rank_blocks, batches_per_rank=rank_batches)
    report(" ".join(f"{k}={v}" for k, v in summary.items() if k not in ("duplicate_keys", "batches_per_rank", "blocks_per_rank")))
    return summary


def _segments(plan: Any) -> np.ndarray:
    """Every reader's segments as rows (shard, start, stop), sorted by shard then start."""
    rows = np.array([(s.shard, s.start, s.stop) for reader in plan.readers for s in reader.segments], dtype=np.int64)
    rows = rows.reshape(-1, 3)
    return rows[np.lexsort((rows[:, 1], rows[:, 0]))]


def coverage(plan: Any) -> Tuple[int, int]:
    """(samples planned, distinct samples planned): the union of the segments of each shard."""
    rows = _segments(plan)
    if not len(rows):
        return 0, 0
    planned = int((rows[:, 2] - rows[:, 1]).sum())
    unique, shard, reach = 0, -1, 0  # reach: the furthest stop so far within the shard
    for number, start, stop in rows.tolist():
        if number != shard:
            shard, reach = number, start
        if stop > reach:
            unique += stop - max(start, reach)
            reach = stop
    return planned, unique


def duplicate_keys(plan: Any, keys: Dict[Tuple[int, int], str], counts: List[int]) -> int:
    """Reads of a key beyond its first, counting the same key in two places (--verify's check):
    each position's coverage from the segments (difference arrays per shard), weighted onto its key."""
    cover: Dict[int, np.ndarray] = {}
    for number, start, stop in _segments(plan).tolist():
        marks = cover.setdefault(number, np.zeros(counts[number] + 1, dtype=np.int64))
        marks[start] += 1
        marks[min(stop, counts[number])] -= 1
    named: collections.Counter = collections.Counter()
    for number, marks in cover.items():
        for index, times in enumerate(np.cumsum(marks)[:-1].tolist()):
            if times:
                named[keys.get((number, index), "?")] += times
    return sum(n - 1 for n in named.values() if n > 1)
