"""``pretrain data inspect``: what a run would read, before GPU-hours are spent on it.

It uses the very functions training uses (``resolve_sources``, ``epoch_plan``) for any
world size and worker count, simulated in one process with no process group. With
``verify`` it reads every sample once, decodes it with the objective's own processor, and
checks that the plan covers every key exactly once, up to what the remainder policy drops
or repeats.
"""
from __future__ import annotations

import collections
from typing import Any, Callable, Dict, List, Optional, Tuple

from rich.progress import Progress

from framework.data.plan import epoch_plan
from framework.data.sources import Shard, open_shard, resolve_sources, with_counts
from framework.data.stream import Processor
from framework.data.tar import TarFormatError, iter_samples
from framework.errors import DataError, SampleError


def scan_shards(shards: List[Shard], processor: Optional[Processor], report: Callable[[str], None], zero_copy: bool = False) -> Tuple[Dict[Tuple[int, int], str], List[str]]:
    """Read every sample: ({(shard, index): key}, [problems by name])."""
    keys: Dict[Tuple[int, int], str] = {}
    problems: List[str] = []
    with Progress(transient=True) as progress:
        task = progress.add_task("verifying shards", total=len(shards))
        for number, shard in enumerate(shards):
            index = 0
            try:
                with open_shard(shard.url, zero_copy=zero_copy) as stream:
                    for key, sample, _ in iter_samples(stream):
                        keys[number, index] = key
                        index += 1
                        if processor is not None:
                            try:
                                processor(key, sample, shard.url)
                            except SampleError as exc:
                                problems.append(f"bad sample: {shard.url} {key}: {exc}")
            except (TarFormatError, OSError, DataError) as exc:
                problems.append(f"bad shard: {shard.url} (after {index} samples): {exc}")
            if shard.samples is not None and index < shard.samples and not any(shard.url in p for p in problems):
                problems.append(f"bad shard: {shard.url} has {index} samples, its manifest says {shard.samples}")
            progress.advance(task)
    for problem in problems:
        report(problem)
    return keys, problems


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
    report: Callable[[str], None] = print,
) -> Dict[str, Any]:
    shards, ranges, weights = resolve_sources(spec, "data.train")
    shards = with_counts(shards, on_error="skip")  # damaged shards are reported below, not fatal here
    readers = max(num_workers, 1)
    if processor is not None and not processor.one_to_one:
        remainder = "none"  # packed text: documents are split evenly, see ShardStream
    report(f"sources: {len(ranges)}; shards: {len(shards)}; samples: {sum(s.samples for s in shards)}")
    for (first, last), weight in zip(ranges, weights):
        report(f"  source shards {first}..{last - 1}: {sum(s.samples for s in shards[first:last])} samples, weight {weight}")
    keys, problems = scan_shards(shards, processor, report, zero_copy) if verify else ({}, [])
    summary: Dict[str, Any] = {}
    for epoch in range(epochs):
        plan = epoch_plan([s.samples for s in shards], seed, epoch, world_size, readers, batch_size, remainder)
        report(f"epoch {epoch}: {world_size} rank(s) x {readers} worker(s), batch {batch_size}, remainder {remainder}")
        packed = remainder == "none"  # packed text: batches depend on tokenization
        for rank in range(world_size):
            parts = [
                f"worker {w}: " + ("" if packed else f"{plan.reader(rank, w).batches} batches, ")
                + f"{plan.reader(rank, w).samples} samples in {len(plan.reader(rank, w).segments)} segment(s)"
                for w in range(readers)
            ]
            head = "documents split evenly" if packed else f"{sum(plan.reader(rank, w).batches for w in range(readers))} batches"
            report(f"  rank {rank}: {head}  |  " + "  |  ".join(parts))
        read = collections.Counter(
            (segment.shard, index) for reader in plan.readers for segment in reader.segments for index in range(segment.start, segment.stop)
        )
        planned = sum(read.values())
        unique = len(read)
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
            "batches_per_rank": [sum(plan.reader(r, w).batches for w in range(readers)) for r in range(world_size)],
        }
        if verify:
            named = collections.Counter(keys.get(position, "?") for position in read.elements())
            summary["duplicate_keys"] = sum(n - 1 for n in named.values() if n > 1) - plan.repeated
    report(" ".join(f"{k}={v}" for k, v in summary.items() if k != "duplicate_keys").replace(", ", ","))
    return summary
