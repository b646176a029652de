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
        from framework.training.checkpoint import TMP_PREFIX, _remove, commit

        self.best = value
        final = self.run_dir / BEST_CHECKPOINT
        tmp = final.with_name(f"{TMP_PREFIX}{final.name}")
        if trainer.is_global_zero:
            _remove(tmp)
        trainer.strategy.barrier("best-start")
        # Every rank takes part (sharded strategies write one piece per rank); the rename makes a
        # preemption mid-save leave the previous best intact.
        trainer.save_checkpoint(tmp, weights_only=True)
        trainer.strategy.barrier("best-written")
        if trainer.is_global_zero:
            commit(tmp, final)
            record = {"step": trainer.global_step, self.monitor: value}
            (self.run_dir / BEST_RECORD).write_text(json.dumps(record))
        trainer.strategy.barrier("best-committed")

    def state_dict(self) -> Dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.best = float(state["best"])
