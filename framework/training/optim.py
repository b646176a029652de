"""Optimizer and learning-rate schedule from ``optim.*``: AdamW, LARS or LAMB, linear warmup,
cosine decay, and the learning rate scaled from a reference global batch size."""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
from torch import nn

from framework.config.schema import OptimConfig, RunConfig
from framework.errors import ConfigError

OPTIMIZERS = ("adamw", "lars", "lamb")
SCHEDULES = ("cosine", "wsd", "constant")
SCALE_RULES = ("none", "linear", "sqrt")


def check_optim(cfg: OptimConfig) -> None:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name: unknown optimizer {cfg.name!r} (known: {', '.join(OPTIMIZERS)})")
    if cfg.scale_rule not in SCALE_RULES:
        raise ConfigError(f"optim.scale_rule: unknown rule {cfg.scale_rule!r} (known: {', '.join(SCALE_RULES)})")
    if cfg.reference_batch_size < 1:
        raise ConfigError(f"optim.reference_batch_size must be >= 1, not {cfg.reference_batch_size}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: unknown schedule {cfg.schedule!r} (known: {', '.join(SCHEDULES)})")
    if not 0 < cfg.decay_fraction <= 1:
        raise ConfigError(f"optim.decay_fraction must be in (0, 1], not {cfg.decay_fraction}")
    if cfg.lr <= 0 or cfg.grad_clip < 0:
        raise ConfigError("optim.lr must be > 0 and optim.grad_clip >= 0")


def global_batch_size(cfg: RunConfig) -> int:
    """Samples per optimizer step over all ranks."""
    t = cfg.trainer
    return cfg.data.batch_size * t.devices * t.num_nodes * t.accumulate_grad_batches


def scaled_lr(cfg: OptimConfig, global_batch: int) -> float:
    """``optim.lr`` scaled by ``optim.scale_rule`` from ``optim.reference_batch_size`` to ``global_batch``."""
    ratio = global_batch / cfg.reference_batch_size
    factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[cfg.scale_rule]
    return cfg.lr * factor


def resolve_lr(cfg: RunConfig) -> tuple[RunConfig, str]:
    """The config the objective is built from: ``optim.lr`` replaced by the scaled rate and the
    rule set to ``none`` (so it is applied once, and the checkpoint's hyperparameters carry
    the rate actually used), plus a line for the log."""
    batch = global_batch_size(cfg)
    t = cfg.trainer
    lr = scaled_lr(cfg.optim, batch)
    line = (
        f"global batch {batch} = {cfg.data.batch_size} per device x {t.devices} devices x {t.num_nodes} nodes "
        f"x {t.accumulate_grad_batches} accumulation; lr {lr:.4g}"
    )
    if cfg.optim.scale_rule != "none":
        line += f" ({cfg.optim.scale_rule} scaling of {cfg.optim.lr:.4g} from reference batch {cfg.optim.reference_batch_size})"
    optim = dataclasses.replace(cfg.optim, lr=lr, scale_rule="none")
    return dataclasses.replace(cfg, optim=optim), line


def parameter_groups(module: nn.Module, weight_decay: float) -> List[Dict[str, Any]]:
    """Decay matrices only: biases, norm weights (all 1-d tensors) are left undecayed (and,
    for LARS/LAMB, are not given a layer-wise trust ratio either)."""
    decay, no_decay, seen = [], [], set()
    for param in module.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))  # tied weights appear once
        (decay if param.ndim >= 2 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(module: nn.Module, weight_decay: float, lr: float, layer_of: Callable[[str], int],
                       num_layers: int, decay: float) -> List[Dict[str, Any]]:
    """``parameter_groups`` split by layer, each with lr ``lr * decay ** (num_layers + 1 - layer)``
    (MAE's layer-wise decay: the head and last layer learn at ``lr``, the embeddings slowest)."""
    groups: Dict[tuple, Dict[str, Any]] = {}
    seen: set = set()
    for name, param in module.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        layer = min(layer_of(name), num_layers + 1)
        decayed = param.ndim >= 2
        group = groups.setdefault((layer, decayed), {
            "params": [], "weight_decay": weight_decay if decayed else 0.0,
            "lr": lr * decay ** (num_layers + 1 - layer), "layer": layer})
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """Multiplier of the base learning rate at ``step``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def lr_multiplier(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """Multiplier of the base learning rate at ``step`` under ``optim.schedule``."""
    if cfg.schedule == "cosine":
        return warmup_cosine(step, cfg.warmup_steps, max_steps, cfg.min_lr_ratio)
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return 1.0
    decay_start = max(cfg.warmup_steps, int(round(max_steps * (1 - cfg.decay_fraction))))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - cfg.min_lr_ratio) * progress


def build_optimizer(module: nn.Module, cfg: OptimConfig, max_steps: int,
                    groups: Optional[List[Dict[str, Any]]] = None) -> Dict[str, Any]:
    """What ``LightningModule.configure_optimizers`` returns; ``groups`` (with their own ``lr``)
    replace the default decay / no-decay split."""
    check_optim(cfg)
    groups = groups if groups is not None else parameter_groups(module, cfg.weight_decay)
    if cfg.name == "adamw":
        optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    elif cfg.name == "lars":
        optimizer = LARS(groups, lr=cfg.lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    else:
        optimizer = LAMB(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_multiplier(step, cfg, max_steps)
    )
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --- large-batch optimizers -----------------------------------------------------------------
#
# Both scale each tensor's update by a trust ratio ||w|| / ||update||, so every layer moves by
# a similar relative amount whatever the batch size. Under FSDP2 a parameter is a DTensor
# holding one shard per rank: the norms are taken over the whole tensor (DTensor reduces over
# the shards) and the element-wise update runs on the local shard. Groups without weight
# decay (biases, norms) are updated without the ratio, as in the LARS/LAMB papers' practice.


def _local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: in-place updates write through), else ``t``."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _global_norm(t: torch.Tensor) -> torch.Tensor:
    norm = torch.linalg.vector_norm(t.float() if not t.is_floating_point() else t)
    full = getattr(norm, "full_tensor", None)  # DTensor: the reduction over all shards
    return full() if callable(full) else norm


def _trust_ratio(weight_norm: torch.Tensor, update_norm: torch.Tensor, coefficient: float) -> torch.Tensor:
    ratio = coefficient * weight_norm / update_norm
    return torch.where((weight_norm > 0) & (update_norm > 0), ratio, torch.ones_like(ratio))


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al., 2017, arXiv:1708.03888)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: needs grad mode
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                if group["weight_decay"]:  # adapted layers: decay, then the trust ratio
                    update = p.grad.add(p, alpha=group["weight_decay"])
                    ratio = _trust_ratio(_global_norm(p), _global_norm(update), group["trust_coefficient"])
                    local_update = _local(update) * ratio
                else:
                    local_update = _local(p.grad)
                buf = _local(state["momentum_buffer"])
                buf.mul_(group["momentum"]).add_(local_update)
                _local(p).add_(buf, alpha=-group["lr"])
        return loss


class LAMB(torch.optim.Optimizer):
    """Adam with a layer-wise trust ratio (You et al., 2019, arXiv:1904.00962), decoupled decay."""

    def __init__(self, params: Iterable[Any], lr: float, betas: tuple = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Any] = None) -> Optional[torch.Tensor]:
        loss = None
        if closure is not None:  # Lightning's closure runs forward and backward: needs grad mode
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                step = float(state["step"])  # a CPU tensor: no device sync
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                # Bias-corrected Adam direction; on DTensors so the trust ratio sees whole tensors.
                update = (exp_avg / (1 - beta1**step)) / ((exp_avg_sq / (1 - beta2**step)).sqrt() + group["eps"])
                if group["weight_decay"]:
                    update = update.add(p, alpha=group["weight_decay"])
                    ratio = _trust_ratio(_global_norm(p), _global_norm(update), 1.0)
                    _local(p).add_(_local(update) * ratio, alpha=-group["lr"])
                else:
                    _local(p).add_(_local(update), alpha=-group["lr"])
        return loss
