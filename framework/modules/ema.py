"""Exponential moving averages of networks (BYOL/MoCo v3 target, DINO teacher) and their schedules."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that receives no gradients (the optimiser and DDP skip it)."""
    target = copy.deepcopy(module)
    for param in target.parameters():
        param.requires_grad_(False)
    return target


def _held_here(param: torch.Tensor) -> list[torch.Tensor]:
    """The copies of ``param``'s values this process holds: the tensor itself, or under a
    sharding strategy its local shard (FSDP2 DTensor), or its ZeRO-3 partition ``ds_tensor``
    plus the full tensor when ZeRO-3 keeps it gathered (small "persistent" parameters; the
    others are empty placeholders between uses). Target and online are split alike, so the
    update is element-wise on each copy. Duck-typed: no strategy code is imported here."""
    partition = getattr(param, "ds_tensor", None)
    if isinstance(partition, torch.Tensor):
        return [partition] + ([param.data] if param.data.numel() == getattr(param, "ds_numel", -1) else [])
    to_local = getattr(param, "to_local", None)
    return [to_local()] if callable(to_local) else [param]


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, parameter by parameter.

    Buffers (BatchNorm running statistics) are copied: they are not learned, and the target
    uses batch statistics in training anyway."""
    target_params = [t for p in target.parameters() for t in _held_here(p)]
    online_params = [t.detach() for p in online.parameters() for t in _held_here(p)]
    if len(target_params) != len(online_params):
        raise ValueError("ema_update: target and online networks have different parameters")
    torch._foreach_mul_(target_params, momentum)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - momentum)
    for t, o in zip(target.buffers(), online.buffers()):
        t.copy_(o)


def cosine_momentum(step: int, max_steps: int, base: float, final: float = 1.0) -> float:
    """BYOL's schedule: ``final - (final - base) * (cos(pi * step / max_steps) + 1) / 2``."""
    progress = min(max(step / max(max_steps, 1), 0.0), 1.0)
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2


def linear_warmup(step: int, warmup_steps: int, start: float, end: float) -> float:
    """``start`` to ``end`` linearly over ``warmup_steps``, then ``end`` (DINO's teacher temperature)."""
    if step >= warmup_steps:
        return end
    return start + (end - start) * step / max(warmup_steps, 1)
