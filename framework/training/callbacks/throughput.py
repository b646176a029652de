"""Measures samples/s, tokens/s, step time and the share of it spent waiting for data."""
from __future__ import annotations

import time
from typing import Any, Dict

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class Throughput(Callback):
    """Logs ``perf/*`` every ``trainer.log_every_n_steps`` optimizer steps (global figures:
    per-rank counts times world size). ``latest`` holds the last figures for the progress bar."""

    def __init__(self) -> None:
        self.latest: Dict[str, float] = {}
        self._reset(time.perf_counter())

    def _reset(self, now: float) -> None:
        self._window_start = now
        self._batch_end = now
        self._wait = 0.0
        self._samples = 0
        self._tokens = 0
        self._steps = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._reset(time.perf_counter())

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._wait += time.perf_counter() - self._batch_end  # the loader's time to hand over this batch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        now = time.perf_counter()
        self._batch_end = now
        if isinstance(batch, torch.Tensor):
            self._samples += batch.shape[0]
            if batch.ndim >= 2 and not batch.is_floating_point():
                self._tokens += batch.numel()
        if trainer.fit_loop._should_accumulate():
            return
        self._steps += 1
        if self._steps < trainer.log_every_n_steps:
            return
        elapsed = now - self._window_start
        world = trainer.world_size
        self.latest = {
            "perf/step_time_s": elapsed / self._steps,
            "perf/samples_per_s": self._samples * world / elapsed,
            "perf/data_wait_frac": self._wait / elapsed,
        }
        if self._tokens:
            self.latest["perf/tokens_per_s"] = self._tokens * world / elapsed
        pl_module.log_dict(self.latest, rank_zero_only=True)
        self._reset(now)
