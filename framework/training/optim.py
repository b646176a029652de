"""Optimizer and learning-rate schedule from ``optim.*``: AdamW, linear warmup, cosine decay."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch
from torch import nn

from framework.config.schema import OptimConfig
from framework.errors import ConfigError


def parameter_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices only: biases, norm weights (all 1-d tensors) are left undecayed."""
    decay, no_decay, seen = [], [], set()
    for param in module.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights appear once
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(module: nn.Module, cfg: OptimConfig, max_steps: int) -> Dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns."""
    if cfg.name != "adamw":
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r} (known: adamw)")
    optimizer = torch.optim.AdamW(
        parameter_groups(module, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
