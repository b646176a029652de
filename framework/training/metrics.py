"""Metrics shared by objectives."""
from __future__ import annotations

import math

import torch
from lightning.pytorch import LightningModule
from torchmetrics import MeanMetric


def log_token_loss(module: LightningModule, metric: MeanMetric, prefix: str = "val") -> None:
    """Log the token-weighted mean loss over all ranks and its perplexity, then reset.

    Every rank calls this once per validation, whatever its batch count, so the
    reduction inside ``compute`` never waits on a rank that had no batches."""
    loss = metric.compute()
    metric.reset()
    if torch.isnan(loss):
        return
    module.log(f"{prefix}/loss", loss, rank_zero_only=True)
    module.log(f"{prefix}/ppl", torch.tensor(math.exp(min(loss.item(), 50.0))), rank_zero_only=True)
