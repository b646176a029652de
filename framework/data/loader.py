"""Data loaders for any modality: shards + a processor -> batches.

Objectives' DataModules call ``train_loader`` / ``val_loader`` and nothing deeper, so the
streaming internals can change without touching any objective.

Checkpointing: Lightning asks every rank for the loader state but writes only rank 0's
checkpoint. ``ResumableLoader.state_dict`` therefore gathers all ranks' positions into
one state; on load each rank takes its own. If the world size or the number of dataloader
workers changed, the positions are turned into the samples of the current epoch that no
reader has handed out yet, and those are re-planned over the new readers (elastic resume).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional

import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from framework.config.schema import DataConfig
from framework.data.cache import ShardCache
from framework.data.plan import Segment, Sources, epoch_plan, plan_from_sequence
from framework.data.faults import ON_ERROR
from framework.data.sources import Shard, announce_commands, check_shards, resolve_shards, resolve_sources, with_counts
from framework.data.stream import COUNTERS, Processor, ShardStream, collate_arrays
from framework.errors import DataError

log = logging.getLogger(__name__)
STATE_FORMAT = "framework-loader/1"
# The train loader's reported length. Having a length keeps Lightning from prefetching a
# batch (which would checkpoint a position one batch ahead); making it far longer than any
# run keeps a Lightning "epoch" from ending at max_steps: when a finished run is extended,
# Lightning would otherwise start a new epoch with a fresh iterator and lose the position.
ENDLESS_SAMPLES = 1 << 50


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def worker_dataset_states(loader_state: Dict[str, Any], num_workers: int) -> List[Optional[Dict[str, Any]]]:
    """The stream state of each dataloader worker inside a torchdata loader state."""
    if num_workers == 0:
        return [loader_state.get("dataset_state")]
    snapshots = loader_state["_snapshot"]["_worker_snapshots"]
    return [snapshots.get(f"worker_{w}", {}).get("dataset_state") for w in range(num_workers)]


class ResumableLoader(StatefulDataLoader):
    dataset: ShardStream

    def local_state_dict(self) -> Dict[str, Any]:
        """This rank's state only (no collective: safe to call from one rank)."""
        return super().state_dict()

    def counters(self) -> Dict[str, int]:
        """Data counters of this rank, summed over its workers, as of the last batch."""
        totals = dict.fromkeys(COUNTERS, 0)
        for state in worker_dataset_states(self.local_state_dict(), self.num_workers):
            for name, value in (state or {}).get("counters", {}).items():
                totals[name] += value
        return totals

    def state_dict(self) -> Dict[str, Any]:
        local = self.local_state_dict()
        rank, world = _world()
        states: List[Any] = [local]
        if world > 1:  # a collective: every rank is in dump_checkpoint at the same time
            states = [None] * world
            dist.all_gather_object(states, local)
        return {"format": STATE_FORMAT, "world_size": world, "num_workers": self.num_workers, "ranks": states}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("format") != STATE_FORMAT:
            raise DataError("the checkpoint's data loader state is from an unknown format; cannot resume the data position")
        rank, world = _world()
        if state["world_size"] == world and state["num_workers"] == self.num_workers:
            super().load_state_dict(state["ranks"][rank])
            return
        self.dataset.elastic = elastic_remainder(self.dataset, state)
        if rank == 0:
            log.warning(
                "resuming the data position with %d rank(s) x %d worker(s) instead of %d x %d: the rest of the "
                "epoch is re-planned over the new readers", world, self.num_workers, state["world_size"], state["num_workers"],
            )


def elastic_remainder(stream: ShardStream, saved: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The samples of the oldest epoch in progress that no reader has handed out yet."""
    if stream.mode != "epoch":
        return None  # resampled streams have no epoch to complete: new draws continue
    old_world, old_workers = saved["world_size"], saved["num_workers"]
    readers = [worker_dataset_states(saved["ranks"][r], old_workers) for r in range(old_world)]
    started = [s for rank in readers for s in rank if s and s.get("started")]
    if not started:
        return None
    fingerprint = started[0]["fingerprint"]
    epoch = min(s["epoch"] for s in started)
    if any(s.get("elastic_sequence") for s in started if s["epoch"] == epoch):
        sequence = [Segment(*t) for t in next(s["elastic_sequence"] for s in started if s.get("elastic_sequence"))]
        old_plan = plan_from_sequence(sequence, old_world, max(old_workers, 1), fingerprint["batch_size"], fingerprint["remainder"])
    else:
        old_plan = epoch_plan(stream.counts, fingerprint["seed"], epoch, old_world, max(old_workers, 1), fingerprint["batch_size"], fingerprint["remainder"])
    remaining: List[Segment] = []
    for rank in range(old_world):
        for worker, state in enumerate(readers[rank]):
            plan = old_plan.reader(rank, worker)
            if not state or not state.get("started"):
                remaining.extend(plan.segments)
                continue
            if state["epoch"] > epoch:
                continue  # this reader finished the epoch
            index, consumed = state["segment"], state["consumed"]
            if index < len(plan.segments):
                current = plan.segments[index]
                remaining.append(Segment(current.shard, current.start + consumed, current.stop))
                remaining.extend(plan.segments[index + 1 :])
            remaining.extend(Segment(shard, sample, sample + 1) for shard, sample, _ in state["buffer"])
    return {"epoch": epoch, "remaining": remaining}


def shard_cache(data: DataConfig) -> Optional[ShardCache]:
    return ShardCache(data.cache_dir, int(data.cache_limit_gb * 2**30)) if data.cache_dir else None


def check_data_config(data: DataConfig, train_sources: int = 1) -> None:
    """Reject bad data options with a message naming the key (before any process starts)."""
    choices = {"mode": ("epoch", "resampled"), "remainder": ("drop", "pad"), "on_error": ON_ERROR}
    for key, allowed in choices.items():
        if getattr(data, key) not in allowed:
            raise DataError(f"data.{key} must be one of {', '.join(allowed)}, not {getattr(data, key)!r}")
    if data.batch_size < 1 or data.num_workers < 0 or data.shuffle_buffer < 0:
        raise DataError("data.batch_size must be >= 1, data.num_workers >= 0 and data.shuffle_buffer >= 0")
    if train_sources > 1 and data.mode != "resampled":
        raise DataError("data.train has weighted sources: they need data.mode=resampled")


def train_loader(
    shards: List[Shard],
    processor: Processor,
    data: DataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
    sources: Optional[Sources] = None,
    bucket: Optional[Callable[[Any], float]] = None,
) -> ResumableLoader:
    """An endless, shuffled, resumable stream of ``data.batch_size`` batches for this rank
    (epoch after epoch, or resampled draws); the run's ``max_steps`` ends it."""
    if data.mode == "epoch":
        shards = with_counts(shards, data.on_error, announce=rank == 0)
    stream = ShardStream(
        shards, processor, seed=seed, rank=rank, world_size=world_size, batch_size=data.batch_size,
        mode=data.mode, remainder=data.remainder, endless=True, shuffle_buffer=data.shuffle_buffer,
        on_error=data.on_error, sources=sources, length=ENDLESS_SAMPLES, cache=shard_cache(data),
        zero_copy=data.zero_copy, bucket=bucket,
    )
    return ResumableLoader(
        stream, batch_size=data.batch_size, num_workers=data.num_workers, collate_fn=collate_fn or collate_arrays,
        persistent_workers=False,
    )


def val_loader(
    shards: List[Shard],
    processor: Processor,
    data: DataConfig,
    *,
    seed: int,
    rank: int,
    world_size: int,
    collate_fn: Optional[Callable[[List[Any]], Any]] = None,
) -> DataLoader:
    """One pass over held-out shards in a fixed order, every sample on exactly one rank."""
    stream = ShardStream(
        with_counts(shards, data.on_error, announce=rank == 0), processor, seed=seed, rank=rank, world_size=world_size, batch_size=1,
        mode="epoch", remainder="none", endless=False, on_error=data.on_error, cache=shard_cache(data),
        zero_copy=data.zero_copy,
    )
    return DataLoader(
        stream, batch_size=data.val_batch_size or data.batch_size, num_workers=min(data.num_workers, 1),
        collate_fn=collate_fn or collate_arrays,
    )


class ShardDataMixin:
    """What every modality's LightningDataModule shares: its shards and this rank's place."""

    def resolve_data(self, data: DataConfig) -> None:
        """Sets ``train_shards``, ``sources`` (weighted source ranges) and ``val_shards``,
        planned (checked, and counted in epoch mode) under ``data.on_error`` before any
        process starts; faults are announced by rank 0 alone."""
        shards, ranges, weights = resolve_sources(data.train, "data.train")
        self.sources = Sources(tuple(ranges), tuple(weights))
        check_data_config(data, len(ranges))
        announce = rank_zero_only.rank == 0
        if announce:
            announce_commands(shards, "data.train")
            if data.val:
                announce_commands(resolve_shards(data.val, "data.val"), "data.val")
        self.train_shards = check_shards(shards, data.on_error, data.mode == "epoch", "data.train", announce)
        self.val_shards = check_shards(resolve_shards(data.val, "data.val"), data.on_error, True, "data.val", announce) if data.val else []

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
