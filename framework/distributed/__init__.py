"""How a model is spread over devices: one config key, one file per strategy.

``trainer.strategy`` = ``ddp`` (ddp.py), ``fsdp`` (fsdp.py: FSDP2 per repeated block) or
``deepspeed`` (deepspeed.py: ZeRO 1-3); ``auto`` is ddp with several devices and Lightning's
single-device strategy with one. ``build_trainer`` calls ``build_strategy``; ``check_strategy``
validates every strategy option before any process starts. Models only declare
``repeated_blocks`` (blocks.py finds them); nothing here imports a model.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from lightning.pytorch.strategies import Strategy

from framework.config.schema import RunConfig, TrainerConfig
from framework.distributed.blocks import find_blocks, prepare_blocks, repeated_block_types  # noqa: F401
from framework.errors import ConfigError

STRATEGIES = ("auto", "ddp", "fsdp", "deepspeed")
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
SHARDED = ("fsdp", "deepspeed")  # strategies whose checkpoints are directories of per-rank shards


def world_size(trainer: TrainerConfig) -> int:
    return trainer.devices * trainer.num_nodes


def on_cpu(trainer: TrainerConfig) -> bool:
    return trainer.accelerator == "cpu" or (trainer.accelerator == "auto" and not torch.cuda.is_available())


def strategy_name(trainer: TrainerConfig) -> str:
    """The strategy that runs: ``auto`` resolved (ddp with several devices, else single device)."""
    if trainer.strategy == "auto":
        return "ddp" if world_size(trainer) > 1 else "single"
    return trainer.strategy


def check_strategy(cfg: RunConfig) -> None:
    """One ConfigError naming the key for any bad strategy, precision or memory option."""
    from framework.distributed.deepspeed import check_deepspeed
    from framework.distributed.fsdp import check_fsdp

    t = cfg.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy: unknown strategy {t.strategy!r} (known: {', '.join(STRATEGIES)})")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision: unknown precision {t.precision!r} (known: {', '.join(PRECISIONS)})")
    name = strategy_name(t)
    # Checked on CPU (gloo, 2 processes): 32, bf16-mixed and bf16-true run under ddp, fsdp and
    # deepspeed 1-3; 16-mixed needs CUDA (Lightning has no fp16 autocast + scaler on CPU).
    if t.precision == "16-mixed" and on_cpu(t):
        raise ConfigError(
            "trainer.precision=16-mixed is not supported on CPU (fp16 autocast with loss scaling needs a CUDA GPU); "
            "use bf16-mixed or 32"
        )
    if t.peak_flops < 0:
        raise ConfigError(f"trainer.peak_flops must be >= 0 (0 = look up or measure), not {t.peak_flops}")
    if name == "fsdp":
        check_fsdp(t.fsdp, world_size(t), cpu=on_cpu(t))
    if name == "deepspeed":
        check_deepspeed(t.deepspeed, cfg.optim.name)
        if t.compile and t.deepspeed.stage == 3:
            raise ConfigError(
                "trainer.compile with trainer.deepspeed.stage=3 is not supported: ZeRO-3 gathers weights in "
                "module hooks that torch.compile would have to trace; use stage 1/2 or trainer.strategy=fsdp"
            )


def build_strategy(cfg: RunConfig) -> Union[Strategy, str]:
    """The Lightning strategy for ``trainer.strategy`` (a name only when Lightning's default fits)."""
    t = cfg.trainer
    name = strategy_name(t)
    if name == "single":
        return "auto"
    if name == "ddp":
        from framework.distributed.ddp import FrameworkDDPStrategy

        return FrameworkDDPStrategy()
    if name == "fsdp":
        from framework.distributed.fsdp import FSDP2Strategy

        return FSDP2Strategy(t.fsdp)
    from framework.distributed.deepspeed import DeepSpeedAnyDeviceStrategy, use_cpu_accelerator

    if on_cpu(t):
        use_cpu_accelerator()
    return DeepSpeedAnyDeviceStrategy(t.deepspeed)


def describe_strategy(strategy: Union[Strategy, str, None]) -> str:
    describe = getattr(strategy, "describe", None)
    return describe() if callable(describe) else type(strategy).__name__ if strategy is not None else "single device"


def is_sharded(strategy: Optional[Strategy]) -> bool:
    """Whether this strategy writes a checkpoint as a directory of per-rank shards."""
    return getattr(strategy, "strategy_name", None) in SHARDED
