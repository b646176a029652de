"""Images as patch sequences, and which patches a masked-image-modelling objective hides.

``patchify`` orders patches row by row and each patch's values as (row, column, channel),
the order MAE uses, so ``unpatchify(patchify(x)) == x``.
"""
from __future__ import annotations

import math
import random
from typing import Optional

import torch


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, H/p * W/p, p*p*C)."""
    n, c, h, w = images.shape
    if h % patch or w % patch:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {patch}")
    x = images.reshape(n, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, channels: int, grid: tuple[int, int]) -> torch.Tensor:
    """Inverse of ``patchify``: (N, L, p*p*C) -> (N, C, H, W) for a ``grid`` of (H/p, W/p) patches."""
    n = patches.shape[0]
    gh, gw = grid
    x = patches.reshape(n, gh, gw, patch, patch, channels).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(n, channels, gh * patch, gw * patch)


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Each patch to zero mean and unit variance over its pixels (MAE's ``norm_pix_loss`` target)."""
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def random_masking(batch: int, length: int, ratio: float, device: torch.device | str = "cpu",
                   generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE's per-sample random masking of exactly ``round(length * ratio)`` patches.

    Returns ``(keep, mask, restore)``: ``keep`` (N, L_visible) indices of the visible patches,
    ``mask`` (N, L) bool with True where a patch is hidden, and ``restore`` (N, L), the
    permutation that puts [visible..., masked...] back in patch order."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
    num_masked = int(round(length * ratio))
    num_masked = min(max(num_masked, 1), length - 1)  # at least one patch hidden and one visible
    noise = torch.rand(batch, length, device=device, generator=generator)
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    keep = shuffle[:, : length - num_masked]
    mask = torch.ones(batch, length, dtype=torch.bool, device=device)
    mask.scatter_(1, keep, False)
    return keep, mask, restore


def block_masking(batch: int, grid: tuple[int, int], ratio: float, min_patches: int = 4,
                  min_aspect: float = 0.3, seed: Optional[int] = None) -> torch.Tensor:
    """BEiT's blockwise masking (Bao et al. 2022, Algorithm 1): hide random rectangles of at
    least ``min_patches`` patches with aspect ratio in [min_aspect, 1/min_aspect] until
    ``ratio`` of the grid is hidden. Returns (N, H*W) bool, True = hidden.

    Rectangles that would overshoot the budget are retried; on tiny grids where none fits,
    single random patches complete the budget so every sample hides the same count."""
    gh, gw = grid
    total = gh * gw
    budget = max(1, min(total - 1, int(round(total * ratio))))
    rng = random.Random(seed) if seed is not None else random.Random(torch.randint(0, 2**31, (1,)).item())
    masks = torch.zeros(batch, gh, gw, dtype=torch.bool)
    for b in range(batch):
        mask = masks[b]
        count, attempts = 0, 0
        while count < budget and attempts < 100:
            attempts += 1
            target = rng.uniform(min(min_patches, budget - count), budget - count)
            aspect = math.exp(rng.uniform(math.log(min_aspect), math.log(1 / min_aspect)))
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if h < 1 or w < 1 or h > gh or w > gw:
                continue
            top, left = rng.randint(0, gh - h), rng.randint(0, gw - w)
            new = h * w - int(mask[top : top + h, left : left + w].sum())
            if 0 < new <= budget - count:
                mask[top : top + h, left : left + w] = True
                count += new
        free = (~mask).flatten().nonzero().flatten().tolist()
        rng.shuffle(free)
        for index in free[: budget - count]:
            mask.view(-1)[index] = True
    return masks.flatten(1)
