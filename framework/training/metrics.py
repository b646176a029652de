"""Metrics shared by objectives: validation losses, one per named ``data.val`` set."""
from __future__ import annotations

import math
import warnings

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric


def log_val_loss(module: LightningModule, metric: MeanMetric, prefix: str = "val", perplexity: bool = False) -> None:
    """Log the (weighted) mean loss over all ranks as ``<prefix>/loss`` (and its perplexity as
    ``<prefix>/ppl``), then reset.

    Every rank calls this once per validation, whatever its batch count, so the reduction
    inside ``compute`` never waits on a rank that had no batches; a set with no loss anywhere
    (e.g. HuBERT's validation shards without frame targets) logs nothing."""
    with warnings.catch_warnings():  # a rank without batches computes too, to take part
        warnings.filterwarnings("ignore", message=".*compute.*before.*update", category=UserWarning)
        loss = metric.compute()
    metric.reset()
    if torch.isnan(loss):
        return
    module.log(f"{prefix}/loss", loss, rank_zero_only=True)
    if perplexity:
        module.log(f"{prefix}/ppl", torch.tensor(math.exp(min(loss.item(), 50.0))), rank_zero_only=True)


class ValidationLosses:
    """Every objective's validation loss, per set of ``data.val``: one spec logs ``val/loss``;
    named sets (``data.val: {old: ..., new: ...}``, one loader each, in order) log
    ``val/old/loss``, ``val/new/loss``, ...: what forgetting is measured with. The text
    objectives set ``val_perplexity`` (and weight losses by tokens) to add ``val/<set>/ppl``.

    The objective calls ``init_validation()`` in ``__init__`` and ``record_val_loss`` in
    ``validation_step(batch, batch_idx, dataloader_idx=0)``; this mixin logs at epoch end."""

    val_perplexity = False

    def init_validation(self) -> None:
        from torch import nn

        from framework.data.loader import val_set_names

        self.val_names = val_set_names(self.cfg.data.val) or [""]
        self.val_losses = nn.ModuleList(MeanMetric() for _ in self.val_names)

    def val_prefix(self, dataloader_idx: int = 0, root: str = "val") -> str:
        """``val`` for one unnamed set, ``val/<name>`` for a named one (``root`` for other families)."""
        name = self.val_names[dataloader_idx]
        return f"{root}/{name}" if name else root

    def record_val_loss(self, loss: torch.Tensor, dataloader_idx: int = 0, weight: float = 1.0) -> None:
        # Ranks may hold different numbers of validation batches: no collective here.
        self.val_losses[dataloader_idx].update(loss, weight=weight)

    def on_validation_epoch_end(self) -> None:
        for index, metric in enumerate(self.val_losses):
            log_val_loss(self, metric, self.val_prefix(index), perplexity=self.val_perplexity)
