"""Representation health, online and cheap: is the encoder collapsing?

At every validation the callback embeds one fixed batch (the first of the first validation
set: the same samples each time) with the encoder the objective would export, and logs

- ``health/rankme``: RankMe (Garrido et al. 2023, arXiv:2210.02885), the effective rank of
  the embeddings, exp of the entropy of their normalised singular values: from 1 (every
  sample on one line) to min(batch, dim);
- ``health/feature_std``: the per-dimension standard deviation of the L2-normalised
  embeddings, averaged and times sqrt(dim) (SimSiam's collapse check): ~1 when they spread
  over the sphere, 0 when every sample maps to one point;
- ``health/teacher_entropy`` for teacher-student objectives (DINO): the mean entropy, in
  nats, of the teacher's output distribution over its prototypes: log(K) when uniform, 0
  when one-hot (the two ways DINO collapses).

Each rank embeds its own first batch (no collective beyond the forward itself); rank 0 logs.
The objective says what to embed: ``health_features(batch)``, else ``probe_features(batch)``,
else ``features(images)`` of a labelled image batch; ``teacher_probabilities(batch)``
(optional) gives the teacher's distribution.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

log = logging.getLogger(__name__)


def rankme(embeddings: torch.Tensor, eps: float = 1e-7) -> float:
    """exp(-sum p_k log p_k), p = singular values / their sum (+ eps): the effective rank."""
    singular = torch.linalg.svdvals(embeddings.double())
    p = singular / singular.sum().clamp_min(1e-30) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(embeddings: torch.Tensor) -> float:
    """Mean per-dimension std of the L2-normalised rows, times sqrt(dim): ~1 spread, 0 collapsed."""
    z = torch.nn.functional.normalize(embeddings.double(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


def mean_entropy(probabilities: torch.Tensor) -> float:
    """Mean entropy (nats) of the rows of a (N, K) probability matrix."""
    p = probabilities.double().clamp_min(1e-30)
    return float(-(p * p.log()).sum(dim=1).mean())


def embed(pl_module: LightningModule, batch: Any) -> Optional[torch.Tensor]:
    """The embeddings the objective's exported encoder gives ``batch`` (None: nothing to embed)."""
    if hasattr(pl_module, "health_features"):
        return pl_module.health_features(batch)
    if isinstance(batch, dict) and hasattr(pl_module, "probe_features"):
        return pl_module.probe_features(batch)
    if isinstance(batch, dict) and "image" in batch and hasattr(pl_module, "features"):
        from framework.augment import to_float_images

        return pl_module.features(to_float_images(batch["image"]))
    return None


class HealthMonitor(Callback):
    def __init__(self) -> None:
        self._results: Dict[str, float] = {}
        self._warned = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._results = {}

    def on_validation_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if batch_idx != 0 or dataloader_idx != 0 or trainer.sanity_checking:
            return
        with torch.no_grad():
            embeddings = embed(pl_module, batch)
            teacher = pl_module.teacher_probabilities(batch) if hasattr(pl_module, "teacher_probabilities") else None
        if embeddings is None:
            if not self._warned:
                log.warning("representation health: objective %s gives no embeddings to check", type(pl_module).__module__)
                self._warned = True
            return
        embeddings = embeddings.detach().float().flatten(1)
        if embeddings.shape[0] >= 2:
            self._results = {"health/rankme": rankme(embeddings), "health/feature_std": feature_std(embeddings)}
        if teacher is not None:
            self._results["health/teacher_entropy"] = mean_entropy(teacher.detach())

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for name, value in self._results.items():
            pl_module.log(name, value, rank_zero_only=True)
