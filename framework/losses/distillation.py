"""Self-distillation losses: BYOL's regression and DINO's cross-entropy with centring."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F


def byol_regression(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL's loss (Grill et al. 2020, Eq. 2): ``2 - 2 cos(p, z')`` averaged over the batch.
    The target is detached: only the online network learns from it."""
    p = F.normalize(prediction.float(), dim=-1)
    z = F.normalize(target.detach().float(), dim=-1)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def dino_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor], center: torch.Tensor,
              student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO's loss (Caron et al. 2021, Alg. 1): for every pair (teacher view a, student view b)
    with a != b, the cross-entropy between the teacher's centred, sharpened softmax and the
    student's softmax, averaged over pairs and samples. ``teacher`` holds the global views
    only (the first ``len(teacher)`` entries of ``student`` are the same views)."""
    targets = [F.softmax((t.detach().float() - center) / teacher_temp, dim=-1) for t in teacher]
    log_probs = [F.log_softmax(s.float() / student_temp, dim=-1) for s in student]
    total, pairs = 0.0, 0
    for a, target in enumerate(targets):
        for b, log_prob in enumerate(log_probs):
            if a == b:
                continue  # the same view seen by both networks gives no signal
            total = total + (-target * log_prob).sum(dim=-1).mean()
            pairs += 1
    return total / pairs


@torch.no_grad()
def batch_center(teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """This rank's contribution to DINO's centre: the mean teacher output over samples and views
    (every rank has the same batch size, so the mean over ranks is the global mean)."""
    return torch.cat([t.float() for t in teacher]).mean(dim=0)
