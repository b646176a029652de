"""Contrastive losses with negatives from every rank (SimCLR's NT-Xent, MoCo v3's InfoNCE).

Both are means over this rank's rows of a softmax cross-entropy against the global batch,
so with DDP's gradient averaging, 2 ranks x batch b give the value and gradients of
1 rank x batch 2b (the gathers carry gradients, see ``framework.modules.gather``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.modules.gather import all_gather_no_grad, all_gather_with_grad, rank


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5, gather: bool = True) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy (Chen et al. 2020, Eq. 1).

    ``z1[i]`` and ``z2[i]`` are projections of two views of sample i. Every one of the 2N
    global embeddings is the anchor of one row: its positive is the other view of the same
    sample, its 2N - 2 negatives all other embeddings of all ranks (itself excluded)."""
    n = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]), dim=1)  # (2n, d): [view1; view2]
    if gather:
        # Keep the per-rank [view1; view2] blocks; row r*2n + j of ``everything`` is rank r's row j.
        everything = all_gather_with_grad(local)
        offset = rank() * 2 * n
    else:
        everything, offset = local, 0
    logits = local.float() @ everything.float().T / temperature  # (2n, 2n * world)
    rows = torch.arange(2 * n, device=local.device)
    self_index = offset + rows
    positive = offset + (rows + n) % (2 * n)
    logits[rows, self_index] = float("-inf")  # an embedding is not its own negative
    return F.cross_entropy(logits, positive)


def info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2, gather: bool = True) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie, He 2021, Alg. 1): queries ``q`` (with gradient)
    against momentum keys ``k`` (no gradient) of the whole global batch; the positive of
    query i is key i. Scaled by 2 * temperature, as in the paper's code."""
    q = F.normalize(q.float(), dim=1)
    k = F.normalize(k.detach().float(), dim=1)
    if gather:
        keys, offset = all_gather_no_grad(k), rank() * q.shape[0]
    else:
        keys, offset = k, 0
    logits = q @ keys.T / temperature
    labels = offset + torch.arange(q.shape[0], device=q.device)
    return F.cross_entropy(logits, labels) * (2 * temperature)
