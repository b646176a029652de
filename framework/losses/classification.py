"""Classification losses for fine-tuning: cross-entropy with label smoothing and mixup."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def soft_targets(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """One-hot rows with ``smoothing`` spread evenly over all classes (Szegedy et al. 2016)."""
    targets = F.one_hot(labels, num_classes).float()
    return targets * (1.0 - smoothing) + smoothing / num_classes


def mixed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, smoothing: float = 0.0,
                        permutation: Optional[torch.Tensor] = None, lam: float = 1.0) -> torch.Tensor:
    """Cross-entropy against smoothed targets; with ``permutation`` and ``lam`` (mixup, Zhang et
    al. 2018) the target is ``lam * y + (1 - lam) * y[permutation]``, as the inputs were mixed."""
    targets = soft_targets(labels, logits.shape[-1], smoothing)
    if permutation is not None:
        targets = lam * targets + (1.0 - lam) * targets[permutation]
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
