"""Masked-image-modelling losses: MAE's pixel regression and BEiT's visual-token prediction."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.modules.patches import normalize_patches


def masked_pixel_loss(prediction: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor,
                      normalize_target: bool = True) -> torch.Tensor:
    """MAE's loss (He et al. 2022, Sec. 3): mean squared error over the pixels of the *masked*
    patches only; with ``normalize_target`` every target patch is standardised by its own
    mean and variance (``norm_pix_loss``, which the paper finds gives better representations).

    prediction, patches: (N, L, p*p*C); mask: (N, L) bool, True = hidden."""
    target = normalize_patches(patches.float()) if normalize_target else patches.float()
    per_patch = ((prediction.float() - target) ** 2).mean(dim=-1)
    weights = mask.float()
    return (per_patch * weights).sum() / weights.sum().clamp_min(1.0)


def masked_token_loss(logits: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BEiT's loss (Bao et al. 2022, Eq. 1): cross-entropy of the visual token of each masked
    patch. logits (N, L, K), tokens (N, L) long, mask (N, L) bool."""
    return F.cross_entropy(logits[mask].float(), tokens[mask])
