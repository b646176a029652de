"""Build the Lightning Trainer from the config and run ``fit``, resuming when asked."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import List, Optional

from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from framework.config.load import config_to_dict, save_config
from framework.config.schema import RunConfig
from framework.errors import ConfigError
from framework.objectives import objective_module
from framework.training.callbacks.progress import ProgressDisplay
from framework.training.callbacks.throughput import Throughput
from framework.training.loggers import JsonlLogger, drop_rows_after, make_wandb_logger

CHECKPOINT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
STRATEGIES = ("auto", "ddp")
PRECISIONS = ("32", "32-true", "bf16-mixed", "bf16-true", "16-mixed")
_STEP = re.compile(r"step-(\d+)\.ckpt$")


def checkpoint_step(path: Path) -> int:
    match = _STEP.search(path.name)
    if not match:
        raise ConfigError(f"cannot tell the step of checkpoint {path} (expected a name like step-00000100.ckpt)")
    return int(match.group(1))


def newest_checkpoint(run_dir: Path) -> Optional[Path]:
    candidates = [p for p in (run_dir / CHECKPOINT_DIR).glob("step-*.ckpt") if _STEP.search(p.name)]
    return max(candidates, key=checkpoint_step, default=None)


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
    if not path.is_file():
        raise ConfigError(f"run.resume: checkpoint not found: {path}")
    return path


def check_trainer(cfg: RunConfig) -> None:
    t = cfg.trainer
    if t.strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy: unknown strategy {t.strategy!r} (known: {', '.join(STRATEGIES)})")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision: unknown precision {t.precision!r} (known: {', '.join(PRECISIONS)})")
    for key in ("max_steps", "devices", "num_nodes", "accumulate_grad_batches", "val_every_steps", "checkpoint_every_steps", "log_every_steps"):
        if getattr(t, key) < 1:
            raise ConfigError(f"trainer.{key} must be at least 1, not {getattr(t, key)}")
    if cfg.data.batch_size < 1 or cfg.data.num_workers < 0:
        raise ConfigError("data.batch_size must be >= 1 and data.num_workers >= 0")


def build_trainer(cfg: RunConfig, extra_callbacks: List[Callback] = ()) -> Trainer:
    t, run_dir = cfg.trainer, Path(cfg.run.dir)
    strategy = t.strategy
    if strategy == "auto" and t.devices * t.num_nodes > 1:
        strategy = "ddp"  # Lightning would pick ddp_spawn on CPU, which re-imports everything per rank
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename="step-{step:08d}",
        auto_insert_metric_name=False,
        every_n_train_steps=t.checkpoint_every_steps,
        save_top_k=t.keep_last_checkpoints,
        monitor="step",
        mode="max",
    )
    loggers = [JsonlLogger(run_dir / METRICS_FILE)]
    wandb = make_wandb_logger(cfg.logging, run_dir, config_to_dict(cfg))
    if wandb is not None:
        loggers.append(wandb)
    callbacks: List[Callback] = [checkpoints, Throughput(), *extra_callbacks]
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
        val_check_interval=t.val_every_steps * t.accumulate_grad_batches,
        check_val_every_n_epoch=None,
        limit_val_batches=(1.0 if t.val_batches < 0 else t.val_batches),
        num_sanity_val_steps=0,
        gradient_clip_val=cfg.optim.grad_clip or None,
        accumulate_grad_batches=t.accumulate_grad_batches,
        log_every_n_steps=t.log_every_steps,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=run_dir,
        enable_progress_bar=False,
        enable_model_summary=False,
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


def fit(cfg: RunConfig) -> Path:
    """Train as configured; returns the run directory. User errors surface before any
    process group starts: the data, tokenizer and options are checked while building."""
    _quiet_known_warnings()
    check_trainer(cfg)
    run_dir = Path(cfg.run.dir)
    ckpt = resume_checkpoint(cfg)
    seed_everything(cfg.run.seed, workers=True, verbose=False)
    module, datamodule = objective_module(cfg.objective.name).build(cfg)
    trainer = build_trainer(cfg)
    if rank_zero_only.rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        if ckpt is not None:
            drop_rows_after(run_dir / METRICS_FILE, checkpoint_step(ckpt))
    rank_zero_info(f"run directory: {run_dir.resolve()}" + (f"  (resuming from {ckpt.name})" if ckpt else ""))
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None)
    final = run_dir / CHECKPOINT_DIR / f"step-{trainer.global_step:08d}.ckpt"
    if not final.exists():
        trainer.save_checkpoint(final)  # every rank takes part; the end state is always resumable
    return run_dir
