"""Logs the data stream's counters (``data/*``), summed over ranks and workers, so faults
skipped under ``data.on_error=skip`` and what the remainder policy drops are never silent."""
from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.data.loader import ResumableLoader
from framework.data.stream import COUNTERS


class DataCounters(Callback):
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.fit_loop._should_accumulate() or (trainer.global_step % trainer.log_every_n_steps):
            return
        loader = trainer.train_dataloader
        if not isinstance(loader, ResumableLoader):
            return
        counters = loader.counters()
        values = torch.tensor([float(counters[name]) for name in COUNTERS], device=pl_module.device)
        values = trainer.strategy.reduce(values, reduce_op="sum")  # every rank is here at this step
        pl_module.log_dict({f"data/{name}": values[i] for i, name in enumerate(COUNTERS)}, rank_zero_only=True)
