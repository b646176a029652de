"""What one rank holds: bytes of parameters and of optimizer state, whatever the strategy.

Counted by storage (each distinct buffer once), so flattened buffers (ZeRO 1/2 keep the
parameters in one flat buffer per group), views and tied weights are not counted twice:

* parameters: the model's parameters as this rank stores them: the whole tensor (ddp,
  ZeRO 1/2), the local shard of a DTensor (FSDP2), the partition ``ds_tensor`` (ZeRO-3);
* optimizer: the base optimizer's state (moments, steps) plus the tensors it updates when
  they are not the model's own (ZeRO's fp32 master partitions).
"""
from __future__ import annotations

from typing import Dict, Iterable, Set

import torch
from torch import nn


def _local(t: torch.Tensor) -> torch.Tensor:
    ds_tensor = getattr(t, "ds_tensor", None)  # ZeRO-3: the parameter is a placeholder
    if isinstance(ds_tensor, torch.Tensor):
        return ds_tensor
    to_local = getattr(t, "to_local", None)  # FSDP2: a DTensor
    return to_local() if callable(to_local) else t


def _bytes(tensors: Iterable[torch.Tensor], seen: Set[int]) -> int:
    total = 0
    for t in tensors:
        local = _local(t)
        storage = local.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def _state_tensors(optimizer: torch.optim.Optimizer) -> Iterable[torch.Tensor]:
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                yield value


def base_optimizer(optimizer: object) -> torch.optim.Optimizer:
    """The torch optimizer inside Lightning's and DeepSpeed's wrappers."""
    for attribute in ("_optimizer", "optimizer"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return base_optimizer(inner)
    assert isinstance(optimizer, torch.optim.Optimizer)
    return optimizer


def rank_state_bytes(module: nn.Module, optimizer: object) -> Dict[str, int]:
    seen: Set[int] = set()
    params = _bytes(module.parameters(), seen)
    base = base_optimizer(optimizer)
    masters = (p for group in base.param_groups for p in group["params"])
    state = _bytes(_state_tensors(base), seen) + _bytes(masters, seen)
    return {"params": params, "optimizer": state}
