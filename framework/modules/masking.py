"""Token masking for masked language modelling (BERT's 80/10/10 rule)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from framework.losses.language import IGNORE_INDEX


def mask_tokens(
    tokens: torch.Tensor,
    mask_id: int,
    vocab_size: int,
    mask_prob: float = 0.15,
    replace_with_mask: float = 0.8,
    replace_with_random: float = 0.1,
    special_ids: Sequence[int] = (),
    generator: Optional[torch.Generator] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``mask_prob`` of the non-special tokens as targets; of those, replace
    ``replace_with_mask`` by ``mask_id``, ``replace_with_random`` by a random token and keep
    the rest. Returns (inputs, labels) with labels = IGNORE_INDEX where nothing is predicted."""
    def uniform() -> torch.Tensor:
        return torch.rand(tokens.shape, device=tokens.device, generator=generator)

    chosen = uniform() < mask_prob
    for special in special_ids:
        chosen &= tokens != special
    labels = torch.where(chosen, tokens, torch.full_like(tokens, IGNORE_INDEX))
    draw = uniform()
    to_mask = chosen & (draw < replace_with_mask)
    to_random = chosen & (draw >= replace_with_mask) & (draw < replace_with_mask + replace_with_random)
    random_tokens = torch.randint(vocab_size, tokens.shape, device=tokens.device, generator=generator)
    inputs = torch.where(to_mask, torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(to_random, random_tokens, inputs)
    return inputs, labels
