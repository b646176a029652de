"""Image-text contrastive losses with every rank's pairs as negatives: CLIP's and SigLIP's.

Both are exact across ranks: with DDP's gradient averaging, 2 ranks x b pairs give the value
(averaged over ranks) and the gradients of 1 rank x 2b. Neither ever builds the global N x N
logits on one rank:

* ``clip_loss`` (Radford et al. 2021): features of all ranks are gathered *with* gradients and
  each rank scores only its own rows against all columns (n x N, OpenCLIP's "local loss").
  Gathering without gradients (OpenCLIP's default) scales the gradients by 1/world; a local
  loss without gathered gradients is wrong by about 2x. There is no such mode here.
* ``siglip_loss`` (Zhai et al. 2023, arXiv:2303.15343): a sigmoid on every pair; texts travel
  round the ring of ranks in world - 1 neighbour exchanges (n x n logits at a time), and their
  gradients travel back the same way.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from framework.modules.gather import all_gather_with_grad, rank, ring_shift_with_grad, world_size


def clip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, gather: bool = True) -> torch.Tensor:
    """Symmetric cross-entropy of L2-normalised ``image`` and ``text`` features (n, d); pair i
    is (image[i], text[i]); ``logit_scale`` is the multiplier (exp of the stored log)."""
    n = image.shape[0]
    image, text = image.float(), text.float()
    if gather:
        images, texts, offset = all_gather_with_grad(image), all_gather_with_grad(text), rank() * n
    else:
        images, texts, offset = image, text, 0
    labels = offset + torch.arange(n, device=image.device)
    image_to_text = logit_scale * image @ texts.T  # (n, N): this rank's rows only
    text_to_image = logit_scale * text @ images.T
    return (F.cross_entropy(image_to_text, labels) + F.cross_entropy(text_to_image, labels)) / 2


def _sigmoid_pairs(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, positives: bool) -> torch.Tensor:
    """-sum log sigmoid(z_ij (scale x_i . y_j + bias)), z = +1 on the diagonal of a rank's own
    block (its pairs) and -1 everywhere else. As softplus: -log sigmoid(-l) = softplus(l) and
    -log sigmoid(l) = softplus(l) - l, so the only n x n tensor kept for the backward is the logits."""
    logits = (scale * image) @ text.T + bias
    loss = F.softplus(logits).sum()
    return loss - logits.diagonal().sum() if positives else loss


def siglip_loss(image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                gather: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's images against every rank's texts,
    divided by this rank's batch (the paper's -1/|B| sum over the global batch, after DDP's
    mean over ranks)."""
    image, text = image.float(), text.float()
    loss = _sigmoid_pairs(image, text, logit_scale, logit_bias, positives=True)
    if gather:
        for _ in range(world_size() - 1):
            text = ring_shift_with_grad(text)
            loss = loss + _sigmoid_pairs(image, text, logit_scale, logit_bias, positives=False)
    return loss / image.shape[0]
