"""wav2vec 2.0's product quantizer: G codebooks of V entries, one entry chosen per codebook by a
straight-through Gumbel softmax (Baevski et al. 2020, Sec. 2; fairseq's gumbel_vector_quantizer.py).

The chosen entries are concatenated into a code vector of ``out_dim``. Training draws with
Gumbel noise (given, or from torch's generator) at a temperature the objective anneals;
evaluation takes the argmax. Besides the codes it returns what the diversity loss and the
perplexity logs need: the softmax probabilities and the hard choices summed over the frames.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class GumbelQuantizer(nn.Module):
    def __init__(self, in_dim: int, groups: int, entries: int, out_dim: int) -> None:
        super().__init__()
        if out_dim % groups:
            raise ValueError(f"the code vector's width ({out_dim}) must be divisible by the codebooks ({groups})")
        self.groups, self.entries = groups, entries
        self.logits = nn.Linear(in_dim, groups * entries)
        nn.init.normal_(self.logits.weight, std=1.0)
        nn.init.zeros_(self.logits.bias)
        self.codevectors = nn.Parameter(torch.rand(groups * entries, out_dim // groups))

    def forward(self, x: torch.Tensor, temperature: float, gumbel: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, in_dim) -> (codes (N, out_dim), soft probabilities summed over N (G, V),
        hard choices counted over N (G, V)). ``gumbel``: noise (N, G * V), else drawn."""
        n = x.shape[0]
        logits = self.logits(x).float().view(n, self.groups, self.entries)
        probs_sum = logits.softmax(-1).sum(0)
        hard = F.one_hot(logits.argmax(-1), self.entries).to(logits.dtype)
        if self.training:
            if gumbel is None:
                uniform = torch.rand_like(logits).clamp_(1e-10, 1 - 1e-10)
                noise = -torch.log(-torch.log(uniform))
            else:
                noise = gumbel.view(n, self.groups, self.entries).to(logits.dtype)
            soft = ((logits + noise) / temperature).softmax(-1)
            choice = F.one_hot(soft.argmax(-1), self.entries).to(soft.dtype)
            onehot = choice - soft.detach() + soft  # straight through: hard forward, soft backward
        else:
            onehot = hard
        codes = torch.einsum("ngv,gvd->ngd", onehot, self.codevectors.view(self.groups, self.entries, -1).to(onehot.dtype))
        return codes.reshape(n, -1).to(x.dtype), probs_sum, hard.sum(0).detach()


def perplexity(counts: torch.Tensor) -> torch.Tensor:
    """Sum over codebooks of exp(entropy) of the usage distribution ``counts`` (G, V)."""
    probs = counts / counts.sum(-1, keepdim=True).clamp(min=1e-9)
    return torch.exp(-(probs * torch.log(probs + 1e-7)).sum(-1)).sum()
