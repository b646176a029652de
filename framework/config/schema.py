"""The run config: one dataclass per concern.

Objective- and model-specific sections are declared next to the code that reads them
(``framework/objectives/<name>.py`` and ``framework/models/<name>.py``) and chosen by
their ``name`` key; see ``framework/config/load.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from omegaconf import MISSING


@dataclass
class ObjectiveConfig:
    """Base of every objective's section; each objective subclasses it with its own keys."""

    name: str = MISSING


@dataclass
class ModelConfig:
    """Base of every model's section; each model subclasses it with its own keys."""

    name: str = MISSING


@dataclass
class DataConfig:
    # Shard specs: a directory of .tar shards (with or without manifest.json), a file,
    # a brace pattern "shards-{000000..000099}.tar", a glob, or a list of these.
    train: Any = MISSING
    val: Any = None
    tokenizer: Optional[str] = None  # tokenizer.json, text objectives only
    seq_len: int = 256  # tokens per sample (text)
    batch_size: int = 16  # per device
    num_workers: int = 2  # dataloader workers per rank
    shuffle_buffer: int = 256  # samples held by each worker's shuffle buffer
    val_batch_size: Optional[int] = None  # defaults to batch_size


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio at max_steps
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu
    strategy: str = "auto"  # auto | ddp
    precision: str = "32"  # 32 | bf16-mixed | bf16-true | 16-mixed
    accumulate_grad_batches: int = 1
    val_every_steps: int = 200
    val_batches: int = 50  # batches per rank per validation; 0 disables validation
    checkpoint_every_steps: int = 500
    keep_last_checkpoints: int = 3
    log_every_steps: int = 10


@dataclass
class LoggingConfig:
    wandb: str = "auto"  # auto (offline without key or network) | online | offline | disabled
    project: str = "pretrain"
    entity: Optional[str] = None
    run_name: Optional[str] = None
    progress: bool = True  # rich progress bar on rank 0 (plain lines when not a terminal)


@dataclass
class RunSection:
    dir: str = "runs/${objective.name}"
    seed: int = 0
    resume: str = "auto"  # auto (newest checkpoint in dir, if any) | never | <checkpoint path>


@dataclass
class RunConfig:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunSection = field(default_factory=RunSection)
