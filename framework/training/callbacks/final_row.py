"""The run's last step always has its row: Lightning logs training metrics every
``trainer.log_every_steps`` steps only, so a run that ends between two (a resume from step 20
to 30 with ``log_every_steps: 20``) would end without its final loss."""
from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class FinalStepRow(Callback):
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step, every = trainer.global_step, trainer.log_every_n_steps
        if step == 0 or not every or step % every == 0:
            return  # logged already
        # Per-step training metrics are current in callback_metrics at every step, logged or not.
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")}
        if metrics:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step - 1)  # loggers get steps done minus one, as Lightning gives them
