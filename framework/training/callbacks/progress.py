"""A progress display on rank 0: step / max_steps, loss, throughput and ETA.

A rich bar on a terminal; plain lines every ``every`` steps otherwise (Slurm logs, CI)."""
from __future__ import annotations

import sys
import time
from typing import Any, List, Mapping, Optional

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from framework.training.callbacks.throughput import Throughput


class ProgressDisplay(Callback):
    def __init__(self, every: int = 50) -> None:
        self.every = every
        self._progress: Optional[Progress] = None
        self._task = None
        self._start = 0.0
        self._start_step = 0

    def _summary(self, trainer: Trainer) -> str:
        metrics = trainer.callback_metrics
        parts = []
        if "train/loss" in metrics:
            parts.append(f"loss {float(metrics['train/loss']):.4f}")
        parts += [f"{prefix} ppl {float(metrics[prefix + '/ppl']):.2f}" for prefix in val_sets(metrics)
                  if prefix + "/ppl" in metrics]
        throughput = next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)
        if throughput and throughput.latest:
            parts.append(f"{throughput.latest['perf/samples_per_s']:.1f} samples/s")
            if "perf/tokens_per_s" in throughput.latest:
                parts.append(f"{throughput.latest['perf/tokens_per_s']:.0f} tok/s")
        return "  ".join(parts)

    @rank_zero_only
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._start_step = time.perf_counter(), trainer.global_step
        if sys.stderr.isatty():
            self._progress = Progress(
                TextColumn("step"), MofNCompleteColumn(), BarColumn(), TextColumn("{task.fields[summary]}"),
                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=trainer.max_steps, completed=trainer.global_step, summary="")

    @rank_zero_only
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._progress is not None:
            self._progress.update(self._task, completed=step, summary=self._summary(trainer))
        elif step % self.every == 0 and not trainer.fit_loop._should_accumulate():
            done = step - self._start_step
            elapsed = time.perf_counter() - self._start
            eta = elapsed / done * (trainer.max_steps - step) if done else float("nan")
            print(f"step {step}/{trainer.max_steps}  {self._summary(trainer)}  eta {eta:.0f}s", flush=True)

    @rank_zero_only
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = trainer.callback_metrics
        if self._progress is None and not trainer.sanity_checking and val_sets(metrics):
            parts = []
            for prefix in val_sets(metrics):
                parts.append(f"{prefix} loss {float(metrics[prefix + '/loss']):.4f}")
                if prefix + "/ppl" in metrics:
                    parts.append(f"{prefix} ppl {float(metrics[prefix + '/ppl']):.2f}")
            print(f"step {trainer.global_step}  " + "  ".join(parts), flush=True)

    @rank_zero_only
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=trainer.global_step, summary=self._summary(trainer))
            self._progress.stop()


def val_sets(metrics: Mapping[str, Any]) -> List[str]:
    """The validation sets with a loss in ``metrics``: ``val`` or ``val/<name>`` each."""
    return [key.removesuffix("/loss") for key in metrics if key.startswith("val") and key.endswith("/loss")]
