"""Keep the weights of the best validation so far (``best.ckpt`` in the run directory, in the
strategy's own format, with ``best.json`` saying which step and value), for model selection
when fine-tuning: the final step is rarely the best with few labels."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Dict

from lightning.pytorch import Callback, LightningModule, Trainer

BEST_CHECKPOINT = "best.ckpt"
BEST_RECORD = "best.json"


class BestCheckpoint(Callback):
    def __init__(self, run_dir: str | Path, monitor: str, mode: str = "max") -> None:
        self.run_dir, self.monitor, self.mode = Path(run_dir), monitor, mode
        self.best = -math.inf if mode == "max" else math.inf

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        value = float(trainer.callback_metrics[self.monitor])  # the same on every rank (reduced)
        better = value > self.best if self.mode == "max" else value < self.best
        if not better:
            return
        self.best = value
        # Every rank takes part: sharded strategies write one piece per rank.
        trainer.save_checkpoint(self.run_dir / BEST_CHECKPOINT, weights_only=True)
        if trainer.is_global_zero:
            record = {"step": trainer.global_step, self.monitor: value}
            (self.run_dir / BEST_RECORD).write_text(json.dumps(record))

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = float(state["best"])
