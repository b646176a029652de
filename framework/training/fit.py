"""Build the Lightning Trainer from the config and run ``fit``, resuming when asked."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional, Sequence

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from framework.config.load import config_to_dict, save_config
from framework.config.schema import RunConfig
from framework.distributed import PRECISIONS, STRATEGIES, build_strategy, check_strategy  # noqa: F401 (re-exported)
from framework.distributed import describe_strategy, is_sharded, on_cpu, prepare_blocks, strategy_name, world_size
from framework.errors import ConfigError
from framework.objectives import objective_module
from framework.training.callbacks.data_counters import DataCounters
from framework.training.callbacks.final_row import FinalStepRow
from framework.training.callbacks.preemption import Preemption
from framework.training.callbacks.progress import ProgressDisplay
from framework.training.callbacks.throughput import Throughput
from framework.training.environment import check_launch_environment
from framework.training.loggers import (
    JsonlLogger,
    drop_rows_after,
    make_wandb_logger,
    write_row_before_checkpoint,
)
from framework.training.checkpoint import (  # noqa: F401 (checkpoint_step, newest_checkpoint: re-exported)
    CHECKPOINT_DIR,
    Checkpointing,
    check_resume,
    checkpoint_step,
    newest_checkpoint,
    remove_stale_temporaries,
)
from framework.training.optim import check_optim, resolve_lr

METRICS_FILE = "metrics.jsonl"


def resume_checkpoint(cfg: RunConfig) -> Optional[Path]:
    """The checkpoint to resume from according to ``run.resume`` (auto | never | path)."""
    run_dir = Path(cfg.run.dir)
    if cfg.run.resume == "auto":
        return newest_checkpoint(run_dir)
    if cfg.run.resume == "never":
        existing = newest_checkpoint(run_dir)
        if existing is not None:
            raise ConfigError(
                f"run.dir {run_dir} already has checkpoints (newest {existing.name}); "
                "use run.resume=auto to continue it or choose another run.dir"
            )
        return None
    path = Path(cfg.run.resume)
    if not path.exists():  # a file (ddp) or a directory of shards (fsdp, deepspeed)
        raise ConfigError(f"run.resume: checkpoint not found: {path}")
    return path


def run_info(cfg: RunConfig) -> dict:
    """What a checkpoint records about the setup that wrote it (see checkpoint.check_resume)."""
    t = cfg.trainer
    name = strategy_name(t)
    return {
        "strategy": name,
        "world_size": world_size(t),
        "deepspeed_stage": t.deepspeed.stage if name == "deepspeed" else None,
    }


def check_trainer(cfg: RunConfig) -> None:
    t = cfg.trainer
    check_strategy(cfg)  # strategy, its sub-section, precision and memory options
    check_optim(cfg.optim)
    for key in ("max_steps", "devices", "num_nodes", "accumulate_grad_batches", "val_every_steps", "checkpoint_every_steps", "log_every_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key} must be at least 1, not {getattr(t, key)}")
    if t.keep_last_checkpoints < 1 and t.keep_last_checkpoints != -1:
        raise ConfigError(f"trainer.keep_last_checkpoints must be >= 1 or -1 (keep all), not {t.keep_last_checkpoints}")
    if cfg.run.init_from is not None and not Path(cfg.run.init_from).is_file():
        raise ConfigError(f"run.init_from: weights file not found: {cfg.run.init_from}")
    if cfg.data.batch_size < 1 or cfg.data.num_workers < 0:
        raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")


def build_trainer(cfg: RunConfig, extra_callbacks: List[Callback] = (), accumulates_itself: bool = False) -> Trainer:
    """``accumulates_itself``: the objective takes a whole accumulated batch per step and splits
    it (CLIP, whose negatives must span the micro-batches): Lightning does not accumulate then."""
    t, run_dir = cfg.trainer, Path(cfg.run.dir)
    accumulate = 1 if accumulates_itself else t.accumulate_grad_batches
    # auto with several devices is ddp: Lightning would pick ddp_spawn on CPU, which re-imports everything per rank
    strategy = build_strategy(cfg)
    jsonl = JsonlLogger(run_dir / METRICS_FILE)
    loggers: List[Logger] = [jsonl]
    wandb = make_wandb_logger(cfg.logging, run_dir, config_to_dict(cfg))
    if wandb is not None:
        loggers.append(wandb)
    checkpoints = Checkpointing(
        run_dir, t.checkpoint_every_steps, t.keep_last_checkpoints, run_info(cfg), sharded=is_sharded(strategy),
        before_commit=lambda trainer: write_row_before_checkpoint(trainer, jsonl),
    )
    # Checkpointing after the callbacks that log in on_train_batch_end: their metrics are in the
    # row it writes before committing a checkpoint.
    callbacks: List[Callback] = [Throughput(peak_flops=t.peak_flops), DataCounters(), *extra_callbacks, FinalStepRow(), checkpoints]
    if cfg.logging.health and cfg.data.val:
        from framework.evaluate.health import HealthMonitor

        callbacks.insert(2, HealthMonitor())  # before FinalStepRow and checkpoints: its figures join the step's row
    callbacks.append(Preemption(run_dir))  # SIGUSR1/SIGTERM: checkpoint at the next step, requeue under Slurm
    if cfg.logging.progress:
        callbacks.append(ProgressDisplay(every=max(t.log_every_steps, 1)))
    return Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=strategy,
        precision=t.precision,
        max_steps=t.max_steps,
        max_epochs=-1,
        val_check_interval=t.val_every_steps * accumulate,
        check_val_every_n_epoch=None,
        limit_val_batches=(1.0 if t.val_batches < 0 else t.val_batches),
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=accumulate,
        log_every_n_steps=t.log_every_steps,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,  # Checkpointing above replaces Lightning's ModelCheckpoint
        use_distributed_sampler=False,
    )


def _quiet_known_warnings() -> None:
    # Noise that says nothing to our users: the loader's length is set on purpose (see
    # ShardStream.__len__) and epoch-level metrics are already reduced over ranks.
    for message in (
        ".*IterableDataset` has `__len__` defined.*",
        ".*sync_dist=True.*",
        ".*set_vital.*",
        ".*LeafSpec.*",
        ".*does not have many workers.*",
    ):
        warnings.filterwarnings("ignore", message=message)


def fit(cfg: RunConfig, extra_callbacks: Sequence[Callback] = ()) -> Path:
    """Train as configured; returns the run directory. User errors surface before any
    process group starts: the data, tokenizer and options are checked while building."""
    _quiet_known_warnings()
    check_trainer(cfg)
    check_launch_environment(cfg)  # WORLD_SIZE (torchrun) / SLURM_NTASKS (srun) against devices x nodes
    run_dir = Path(cfg.run.dir)
    ckpt = resume_checkpoint(cfg)
    if ckpt is not None:
        from framework.training.trusted import check_checkpoint

        check_checkpoint(ckpt)  # data only: refused, naming the file, before any loader unpickles it
        check_resume(ckpt, run_info(cfg))
    if rank_zero_only.rank == 0:
        remove_stale_temporaries(run_dir)  # saves that crashed before their rename
    built_cfg, batch_line = resolve_lr(cfg)  # the objective sees the learning rate actually used
    seed_everything(cfg.run.seed, workers=True, verbose=False)
    module, datamodule = objective_module(cfg.objective.name).build(built_cfg)
    init_note = ""
    if cfg.run.init_from:
        from framework.training.continual import load_initial_weights

        init_note = load_initial_weights(module, cfg)
    done = prepare_blocks(module, cfg.trainer.activation_checkpointing, cfg.trainer.compile)
    trainer = build_trainer(cfg, extra_callbacks, accumulates_itself=getattr(module, "micro_batches", 1) > 1)
    if rank_zero_only.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        if ckpt is not None:
            drop_rows_after(run_dir / METRICS_FILE, checkpoint_step(ckpt))
    rank_zero_info(f"run directory: {run_dir.resolve()}" + (f"  (resuming from {ckpt.name})" if ckpt else ""))
    rank_zero_info(
        f"strategy {strategy_name(cfg.trainer)} ({describe_strategy(trainer.strategy)}) on "
        f"{world_size(cfg.trainer)} {'CPU processes' if on_cpu(cfg.trainer) else 'devices'}, "
        f"precision {cfg.trainer.precision}; {batch_line}"
        + (f"; {cfg.optim.name}" if cfg.optim.name != "adamw" else "")
        + "".join(f"; {d}" for d in done)
        + (f"; {init_note}" if init_note else "")
    )
    # Checkpointing saves the end state too (every rank takes part), so it is always resumable.
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    return run_dir
