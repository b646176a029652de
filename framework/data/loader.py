"""Data loaders for any modality: shards + a processor -> batches.

Objectives' DataModules call ``train_loader`` / ``val_loader`` and nothing deeper, so the
streaming internals can change without touching any objective.

Checkpointing: Lightning asks every rank for the loader state but writes only rank 0's
checkpoint. ``ResumableLoader.state_dict`` returns the layout (world size, workers) and this
rank's position; the checkpoint callback (``framework.training.checkpoint``) moves the
position into the rank's own file beside the checkpoint, so rank 0 gathers nothing, and on
load hands the loader a reader of those files. Each rank reads its own; if the world size
or the number of dataloader workers changed, the positions are turned into the samples of
the current epoch that no reader has handed out yet, and those are re-planned over the new
readers, each rank reading only the files it needs (``framework.data.elastic``).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Mapping, Optional

import torch.distributed as dist
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from framework.config.schema import DataConfig
from framework.data.cache import ShardCache
from framework.data.elastic import GatheredStates, SavedLoaderStates, elastic_remainder, worker_dataset_states
from framework.data.plan import Sources
from framework.data.faults import ON_ERROR
from framework.data.sources import Shard, announce_commands, check_shards, resolve_shards, resolve_sources, with_counts
from framework.data.stream import COUNTERS, Processor, ShardStream, collate_arrays
from framework.errors import DataError

log = logging.getLogger(__name__)
STATE_FORMAT = "framework-loader/2"  # positions in per-rank files
GATHERED_FORMAT = "framework-loader/1"  # older checkpoints: every rank's position in rank 0's file
LOCAL_KEY = "local"  # this rank's position, until the checkpoint callback moves it into the rank's file
SAVED_KEY = "saved"  # set on load by the checkpoint callback: a SavedLoaderStates over the files
# The train loader's reported length. Having a length keeps Lightning from prefetching a
# batch (which would checkpoint a position one batch ahead); making it far longer than any
# run keeps a Lightning "epoch" from ending at max_steps: when a finished run is extended,
# Lightning would otherwise start a new epoch with a fresh iterator and lose the position.
ENDLESS_SAMPLES = 1 << 50


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(mine: Any) -> List[Any]:
    rank, world = _world()
    if world == 1:
        return [mine]
    parts: List[Any] = [None] * world
    dist.all_gather_object(parts, mine)
    return parts


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
        """What Lightning keeps in its loop state: the layout, and this rank's own position
        under ``LOCAL_KEY``, which the checkpoint callback moves into the rank's own file."""
        rank, world = _world()
        return {"format": STATE_FORMAT, "world_size": world, "num_workers": self.num_workers, LOCAL_KEY: self.local_state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        rank, world = _world()
        saved: Optional[SavedLoaderStates] = None
        if state.get("format") == GATHERED_FORMAT:
            saved = GatheredStates(state)
        elif state.get("format") == STATE_FORMAT:
            saved = state.get(SAVED_KEY)  # the checkpoint callback's reader of the per-rank files
            if saved is None and LOCAL_KEY in state and state["world_size"] == 1:
                saved = GatheredStates({**state, "ranks": [state[LOCAL_KEY]]})
        if saved is None:
            raise DataError(
                "the checkpoint's data loader state is from an unknown format or its per-rank data state files are "
                "missing; cannot resume the data position"
            )
        if saved.world_size == world and saved.num_workers == self.num_workers:
            super().load_state_dict(saved.loader_state(rank))
            return
        self.dataset.elastic = elastic_remainder(self.dataset, saved, rank, world, self.num_workers, gather=_all_gather)
        if rank == 0:
            waiting = (self.dataset.elastic or {}).get("waiting_dropped", 0)
            log.warning(
                "resuming the data position with %d rank(s) x %d worker(s) instead of %d x %d: the rest of the "
                "epoch is re-planned over the new readers%s", world, self.num_workers, saved.world_size, saved.num_workers,
                f"; {waiting} item(s) the old readers had produced from documents already read but not handed out "
                "(packed blocks in their mixing buffers) are not carried over" if waiting else "",
            )


def data_state_stubs(tree: Any) -> List[Dict[str, Any]]:
    """The resumable loaders' entries in a checkpoint's loop state, in a fixed order."""
    found: List[Dict[str, Any]] = []
    if isinstance(tree, dict):
        if tree.get("format") == STATE_FORMAT:
            return [tree]
        for key in sorted(tree, key=str):
            found += data_state_stubs(tree[key])
    elif isinstance(tree, (list, tuple)):
        for value in tree:
            found += data_state_stubs(value)
    return found


def shard_cache(data: DataConfig) -> Optional[ShardCache]:
    return ShardCache(data.cache_dir, int(data.cache_limit_gb * 2**30)) if data.cache_dir else None


def check_data_config(data: DataConfig, train_sources: int = 1) -> None:
    """Reject bad data options with a message naming the key (before any process starts)."""
    choices = {"mode": ("epoch", "resampled"), "remainder": ("drop", "pad"), "on_error": ON_ERROR}
    for key, allowed in choices.items():
        if getattr(data, key) not in allowed:
            raise DataError(f"data.{key} must be one of {', '.join(allowed)}, not {getattr(data, key)!r}")
    if data.batch_size < 1 or data.num_workers < 0 or data.shuffle_buffer < 0 or data.draw_samples < 0:
        raise DataError("data.batch_size must be >= 1, data.num_workers >= 0, data.shuffle_buffer >= 0 and data.draw_samples >= 0")
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
        zero_copy=data.zero_copy, bucket=bucket, draw_samples=data.draw_samples,
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


def val_set_names(val: Any) -> List[str]:
    """The names of ``data.val``'s named sets (``{old: ..., new: ...}``: logged as ``val/old/*``,
    ``val/new/*``), or ``[]`` for one unnamed spec."""
    if isinstance(val, Mapping) or (hasattr(val, "keys") and not isinstance(val, (str, list))):
        names = [str(k) for k in val.keys()]
        bad = [n for n in names if not n or "/" in n]
        if bad or not names:
            raise DataError(f"data.val: set names must be non-empty and have no '/', got {names}")
        return names
    return []


class ShardDataMixin:
    """What every modality's LightningDataModule shares: its shards, this rank's place and
    one validation loader per named ``data.val`` set. ``row_modality`` says which columns of
    row files (Parquet, JSON Lines) its decoder reads (framework/data/formats/)."""

    row_modality = "text"

    def resolve_data(self, data: DataConfig) -> None:
        """Sets ``train_shards``, ``sources`` (weighted source ranges), ``val_shards`` and, for
        named validation sets, ``val_sets`` ({name: shards}), planned (checked, and counted in
        epoch mode) under ``data.on_error`` before any process starts; faults are announced by
        rank 0 alone."""
        from framework.data.formats import row_fields

        names = val_set_names(data.val)
        if data.max_rows_per_read < 1:
            raise DataError(f"data.max_rows_per_read must be >= 1, not {data.max_rows_per_read}")
        self.row_fields = fields = row_fields(data, self.row_modality)
        shards, ranges, weights = resolve_sources(data.train, "data.train", fields)
        self.sources = Sources(tuple(ranges), tuple(weights))
        check_data_config(data, len(ranges))
        announce = rank_zero_only.rank == 0
        specs = {name: data.val[name] for name in names} if names else ({"": data.val} if data.val else {})
        if announce:
            announce_commands(shards, "data.train")
            for name, spec in specs.items():
                announce_commands(resolve_shards(spec, f"data.val.{name}" if name else "data.val", fields), "data.val")
        self.train_shards = check_shards(shards, data.on_error, data.mode == "epoch", "data.train", announce)
        self.val_sets = {
            name: check_shards(resolve_shards(spec, key, fields), data.on_error, True, key, announce)
            for name, spec in specs.items() for key in [f"data.val.{name}" if name else "data.val"]
        }
        self.val_shards = next(iter(self.val_sets.values())) if len(self.val_sets) == 1 else [
            shard for shards_of_set in self.val_sets.values() for shard in shards_of_set]

    def val_loaders(self, make: Callable[[List[Any]], DataLoader]) -> Any:
        """``make(shards)`` for each validation set: one loader, a list for named sets (the
        objective's ``dataloader_idx`` follows their order), or ``[]`` without ``data.val``."""
        if not self.val_shards:
            return []
        loaders = [make(shards) for shards in self.val_sets.values()]
        return loaders if len(loaders) > 1 else loaders[0]

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
