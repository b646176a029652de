"""Who reads what, as a pure function of (seed, epoch, rank, world size, worker, workers).

Training, ``data inspect`` and the tests all use these functions, so what is inspected is
what is trained on. Every rank computes the same global shard permutation for an epoch,
then takes its slice; inside a rank, each dataloader worker takes a slice of that.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List

import numpy as np


@dataclass(frozen=True)
class WorkerPlan:
    shards: List[int]  # shard indices this worker reads, in order
    stride: int = 1  # keep every stride-th sample of those shards ...
    phase: int = 0  # ... starting at this one (sample-level split when shards are too few)


def epoch_order(num_shards: int, seed: int, epoch: int) -> List[int]:
    """The global shard order of an epoch: the same on every rank, new each epoch."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def worker_plan(num_shards: int, seed: int, epoch: int, rank: int, world_size: int, worker: int, num_workers: int) -> WorkerPlan:
    order = epoch_order(num_shards, seed, epoch)
    readers = world_size * num_workers
    reader = rank * num_workers + worker
    if num_shards >= readers:
        # rank r reads order[r::world]; its worker w reads every num_workers-th of those
        return WorkerPlan(order[rank::world_size][worker::num_workers])
    # Fewer shards than readers: everyone reads every shard and keeps its own samples.
    return WorkerPlan(order, stride=readers, phase=reader)
