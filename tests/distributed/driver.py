"""`pretrain fit` plus test-only callbacks, chosen by environment variables so that every rank
gets them (Lightning starts the other ranks by running this script again).

PROBE_OUT=<file>      at the end of training, rank 0 writes the model's logits on fixed tokens
CRASH_AT_SAVE=<step>  every rank dies (os._exit) in the middle of saving that step's checkpoint:
                      after its shard is written to the temporary location, before the commit
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from framework.config.load import load_config
from framework.training.fit import fit

PROBE_TOKENS = (torch.arange(2 * 16).reshape(2, 16) * 7) % 300  # ids below any test vocabulary


class Probe(Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.eval()
        unshard = getattr(pl_module, "unshard", None)  # FSDP2: gather the outer unit (outside a step)
        if callable(unshard):
            unshard()
        with torch.no_grad():  # every rank runs it: sharded strategies gather weights collectively
            logits = pl_module.model.logits(pl_module.model(PROBE_TOKENS.to(pl_module.device)))
        if trainer.is_global_zero:
            torch.save({"tokens": PROBE_TOKENS, "logits": logits.float().cpu()}, self.out)


class CrashInSave(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        original = strategy.save_checkpoint

        def save_then_die(checkpoint, filepath, storage_options=None):
            original(checkpoint, filepath, storage_options) if storage_options else original(checkpoint, filepath)
            if trainer.global_step == self.step:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(17)

        strategy.save_checkpoint = save_then_die


if __name__ == "__main__":
    callbacks = []
    if os.environ.get("PROBE_OUT"):
        callbacks.append(Probe(Path(os.environ["PROBE_OUT"])))
    if os.environ.get("CRASH_AT_SAVE"):
        callbacks.append(CrashInSave(int(os.environ["CRASH_AT_SAVE"])))
    args = sys.argv[1:]
    fit(load_config(args[0], args[1:]), extra_callbacks=callbacks)
