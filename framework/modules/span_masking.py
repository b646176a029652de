"""Span masks over the valid frames of each utterance, and distractors drawn from them
(wav2vec 2.0, Sec. 3.1 and 3.2; HuBERT uses the same masks).

Randomness comes from an explicit ``generator`` so an objective can draw it once per batch,
seeded by (run seed, step, rank), and the losses stay deterministic functions of it.
"""
from __future__ import annotations

from typing import Optional

import torch


def span_mask(frames: torch.Tensor, size: int, mask_prob: float, mask_length: int, min_masks: int = 0,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, size) booleans: for utterance b with ``frames[b]`` valid frames, about
    ``mask_prob * frames[b] / mask_length`` spans of ``mask_length`` frames (at least ``min_masks``;
    the count rounded at random, as fairseq does), starting uniformly without replacement, so
    spans may overlap. No span reaches past the valid frames; an utterance shorter than one span
    is masked whole."""
    mask = torch.zeros(len(frames), size, dtype=torch.bool)
    for row, count in enumerate(frames.tolist()):
        if count <= 0:
            continue
        if count <= mask_length:
            mask[row, :count] = True
            continue
        spans = int(mask_prob * count / mask_length + torch.rand((), generator=generator).item())
        starts_available = count - mask_length + 1
        spans = min(max(spans, min_masks), starts_available)
        if spans == 0:
            continue
        starts = torch.randperm(starts_available, generator=generator)[:spans]
        offsets = (starts[:, None] + torch.arange(mask_length)[None, :]).reshape(-1)
        mask[row, offsets] = True
    return mask.to(frames.device)


def sample_distractors(mask: torch.Tensor, count: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(B, M, count) indices: for the m-th masked frame of utterance b (in time order), ``count``
    other masked frames of the same utterance, uniformly with replacement, never itself (-1
    where none exists: rows beyond the utterance's masked frames, or an utterance with one)."""
    masked = mask.sum(1).tolist()
    longest = max(masked) if masked else 0
    out = torch.full((mask.shape[0], longest, count), -1, dtype=torch.long)
    for row, m in enumerate(masked):
        if m < 2:
            continue
        drawn = torch.randint(m - 1, (m, count), generator=generator)
        out[row, :m] = drawn + (drawn >= torch.arange(m)[:, None])  # skip over the frame itself
    return out.to(mask.device)
