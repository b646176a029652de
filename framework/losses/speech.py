"""The speech objectives' losses as pure functions (wav2vec 2.0, HuBERT).

Sums over frames, so an objective can divide by the global frame count and stay exact across
ranks (see ``framework/objectives/wav2vec2.py``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.modules.quantizer import perplexity


def contrastive_frames(predictions: torch.Tensor, targets: torch.Tensor, distractors: torch.Tensor,
                       temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame wav2vec 2.0 contrastive loss (Eq. 3): frame i's prediction must pick its own
    target among ``distractors[i]`` (K indices into ``targets``; -1: none) by cosine similarity
    / temperature. A distractor equal to the target is ignored, as in fairseq. Returns the
    losses (M,) and whether the target scored highest (M,)."""
    positive = F.cosine_similarity(predictions.float(), targets.float(), dim=-1)
    present = distractors >= 0
    chosen = targets[distractors.clamp(min=0)].float()  # (M, K, D)
    negative = F.cosine_similarity(predictions.float()[:, None, :], chosen, dim=-1)
    same = (chosen == targets.float()[:, None, :]).all(-1)
    negative = negative.masked_fill(~present | same, float("-inf"))
    logits = torch.cat([positive[:, None], negative], dim=1) / temperature
    return -logits.log_softmax(-1)[:, 0], logits.argmax(-1) == 0


def diversity_loss(probs_sum: torch.Tensor) -> torch.Tensor:
    """(G V - perplexity of the mean soft code distribution) / (G V): 0 when every entry of every
    codebook is used equally, (G V - G) / (G V) when one entry per codebook takes all (Eq. 4)."""
    total = probs_sum.numel()
    return (total - perplexity(probs_sum)) / total


def cosine_targets(predictions: torch.Tensor, embeddings: torch.Tensor, targets: torch.Tensor,
                   temperature: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-frame HuBERT loss (Eq. 1 with cosine logits): cross-entropy of cos(prediction, e_c) /
    temperature over the label embeddings ``embeddings`` (C, D) against ``targets`` (M,).
    Returns the losses (M,) and whether the target scored highest (M,)."""
    logits = F.normalize(predictions.float(), dim=-1) @ F.normalize(embeddings.float(), dim=-1).T / temperature
    return F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1) == targets
