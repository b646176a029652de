"""The run config: one dataclass per concern.

Objective- and model-specific sections are declared next to the code that reads them
(``framework/objectives/<name>.py`` and ``framework/models/<name>.py``) and chosen by
their ``name`` key; see ``framework/config/load.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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
    # Shard specs: a directory of .tar shards (with or without manifest.json), a file, a brace
    # pattern "shards-{000000..000099}.tar", a glob, a URL (http(s)://, s3://, gs://, pipe:cmd),
    # or a list of these; for resampled mode also a list of {shards: <spec>, weight: <w>}.
    train: Any = MISSING
    val: Any = None
    tokenizer: Optional[str] = None  # tokenizer.json, text objectives only
    seq_len: int = 256  # tokens per sample (text)
    batch_size: int = 16  # per device
    num_workers: int = 2  # dataloader workers per rank
    shuffle_buffer: int = 256  # raw samples held by each worker's shuffle buffer
    val_batch_size: Optional[int] = None  # defaults to batch_size
    image_size: int = 0  # images: side the loader resizes to (0: from the shards' manifest or first image)
    channels: int = 0  # images: 1 (grayscale) or 3 (RGB); 0: from the shards' manifest or first image
    sample_rate: int = 16000  # audio: clips are resampled to this rate (soxr) unless resample is false
    resample: bool = True  # audio: false makes a clip at another rate a bad sample (named) instead
    max_seconds: float = 15.0  # audio: longer training clips are cropped at random (evaluation: from the start)
    min_seconds: float = 0.0  # audio: shorter clips are left out and counted (data/filtered_samples)
    bucket: bool = True  # audio: batches of similar lengths, drawn from the shuffle buffer (less padding)
    mode: str = "epoch"  # epoch (every sample once per epoch) | resampled (endless weighted draws)
    # resampled: samples per draw, a random stretch of the drawn shard (0: the whole shard). Small
    # draws mix weighted sources finely (a replay of 5% is then 5% of every few batches, not whole
    # shards now and then), at the cost of skipping tar headers to each stretch.
    draw_samples: int = 0
    remainder: str = "drop"  # epoch samples beyond equal full batches per rank: drop | pad (repeat)
    on_error: str = "skip"  # a missing/bad shard or sample: skip (warn, count) | raise
    cache_dir: Optional[str] = None  # local copies of remote shards (http, s3, gs, pipe:)
    cache_limit_gb: float = 100.0  # least recently used copies go beyond this size
    # Memory-map local shards and hand processors memoryviews instead of bytes (no copy per
    # sample: large undecoded samples cost only their tar header). Processors must take any
    # bytes-like value; the framework's own do.
    zero_copy: bool = False
    # Row files (Parquet, JSON Lines .jsonl/.jsonl.gz/.jsonl.zst): which column is what. Other
    # columns become each sample's metadata (its json member), all of them or extra_keys only.
    text_key: str = "text"
    image_key: str = "image"  # raw bytes, or Hugging Face's {bytes, path} struct
    audio_key: str = "audio"  # raw bytes, or Hugging Face's {bytes, path} struct
    caption_key: str = "caption"  # image-text pairs
    id_key: str = "id"  # the sample key (else <file stem>:<row>)
    label_key: str = "label"  # an integer class: the probes' and subgroup reports' label
    extra_keys: Optional[List[str]] = None  # metadata columns to read (null: every other column)
    max_rows_per_read: int = 1024  # Parquet: a larger row group is read in stretches of this many rows


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 3e-4
    weight_decay: float = 0.1
    betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio at max_steps
    # cosine: warmup, then cosine decay over the rest. wsd (warmup-stable-decay): warmup, constant,
    # then a linear decay over the last decay_fraction of the steps; a checkpoint from before the
    # decay continues (more data, longer) without re-warming. constant: warmup, then constant.
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # wsd only
    grad_clip: float = 1.0  # max global gradient norm (over all shards); 0 disables clipping
    momentum: float = 0.9  # lars only (lamb and adamw use betas)
    trust_coefficient: float = 0.001  # lars only: eta of the layer-wise trust ratio
    # Learning rate scaled from a reference global batch size: lr * (global / reference) for
    # linear, lr * sqrt(global / reference) for sqrt, where global = data.batch_size x
    # trainer.devices x trainer.num_nodes x trainer.accumulate_grad_batches (printed at start).
    scale_rule: str = "none"  # none | linear | sqrt
    reference_batch_size: int = 256


@dataclass
class FSDPConfig:
    """``trainer.strategy=fsdp``: FSDP2 ``fully_shard`` per repeated block (framework/distributed/fsdp.py)."""

    reshard_after_forward: bool = True  # free each block's gathered weights after its forward (re-gathered for backward)
    cpu_offload: bool = False  # keep sharded parameters, gradients and optimizer state in CPU memory
    # Ranks that share one copy of the model: 0 = all ranks (full sharding); N = shard within groups
    # of N ranks and replicate across groups (hybrid sharding, HSDP). N = trainer.devices shards
    # within each node and replicates across nodes, keeping the all-gathers on the fast links.
    shard_size: int = 0


@dataclass
class DeepSpeedConfig:
    """``trainer.strategy=deepspeed``: ZeRO stage 1, 2 or 3 (framework/distributed/deepspeed.py)."""

    stage: int = 2  # 1: optimizer state sharded, 2: + gradients, 3: + parameters
    offload_optimizer: bool = False  # optimizer state and step on the CPU (ZeRO-Offload)
    offload_params: bool = False  # stage 3 only: parameters in CPU memory between uses
    overlap_comm: bool = True  # overlap gradient reduction with the backward pass
    # Merged into the generated DeepSpeed config (https://www.deepspeed.ai/docs/config-json/),
    # e.g. {zero_optimization: {reduce_bucket_size: 50000000}}; keys the framework sets from
    # other options (batch sizes, accumulation, clipping, precision, optimizer) are refused.
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    devices: int = 1
    num_nodes: int = 1
    accelerator: str = "auto"  # auto | cpu | gpu
    strategy: str = "auto"  # auto (ddp with several devices) | ddp | fsdp | deepspeed
    fsdp: FSDPConfig = field(default_factory=FSDPConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    precision: str = "32"  # 32 | bf16-mixed | bf16-true | 16-mixed (16-mixed needs a CUDA GPU)
    activation_checkpointing: bool = False  # recompute each repeated block in backward instead of storing its activations
    compile: bool = False  # torch.compile each repeated block
    peak_flops: float = 0.0  # per device, for MFU; 0 = from the GPU table, or measured on CPU
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
    # At every validation: RankMe, feature spread and (DINO) teacher entropy of one fixed
    # validation batch's embeddings (health/*): a collapsing encoder shows there first.
    health: bool = True


@dataclass
class RunSection:
    dir: str = "runs/${objective.name}"
    seed: int = 0
    resume: str = "auto"  # auto (newest checkpoint in dir, if any) | never | <checkpoint path>
    # Start a new run from weights made by `pretrain consolidate` (any strategy, any world size);
    # the optimizer, schedule and data position start fresh.
    init_from: Optional[str] = None


@dataclass
class RunConfig:
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    run: RunSection = field(default_factory=RunSection)
