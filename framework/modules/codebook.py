"""A visual tokenizer learned on image patches: k-means over normalised patch pixels.

BEiT's targets are the ids of a discrete tokenizer trained before pretraining and frozen
during it (the paper uses DALL-E's dVAE, trained on 250M images, which we cannot fetch).
This tokenizer is the smallest faithful stand-in: a codebook of ``size`` centroids fitted
by k-means (k-means++ initialisation, Lloyd iterations) on patches of the first training
batch of all ranks, each patch standardised by its own mean and variance first (so codes
describe shape, not brightness, like MAE's normalised target), then frozen. The codebook
and its ``fitted`` flag are buffers: they are saved in and restored from checkpoints.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from framework.modules.gather import all_gather_no_grad, world_size
from framework.modules.patches import normalize_patches


class PatchCodebook(nn.Module):
    def __init__(self, size: int, patch_pixels: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("codes", torch.zeros(size, patch_pixels))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, patches: torch.Tensor, iterations: int = 20, seed: int = 0) -> None:
        """Fit on (M, p*p*C) local patches; gathers them from all ranks, rank 0's result wins."""
        data = normalize_patches(all_gather_no_grad(patches.float().contiguous()))
        if data.shape[0] < self.size:
            raise ValueError(f"the codebook needs at least {self.size} patches to fit, got {data.shape[0]}")
        generator = torch.Generator(device="cpu").manual_seed(seed)
        data_cpu = data.cpu()
        codes = self._kmeans_plus_plus(data_cpu, generator)
        for _ in range(iterations):
            assign = torch.cdist(data_cpu, codes).argmin(dim=1)
            sums = torch.zeros_like(codes).index_add_(0, assign, data_cpu)
            counts = torch.bincount(assign, minlength=self.size).float()
            empty = counts == 0  # a dead centroid restarts at a random patch
            codes = torch.where(empty[:, None], data_cpu[torch.randint(len(data_cpu), (self.size,), generator=generator)],
                                sums / counts.clamp_min(1)[:, None])
        self.codes.copy_(codes.to(self.codes.device))
        if world_size() > 1:
            dist.broadcast(self.codes, src=0)  # identical targets on every rank, whatever float noise
        self.fitted.fill_(True)

    def _kmeans_plus_plus(self, data: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        first = torch.randint(len(data), (1,), generator=generator)
        codes = [data[first[0]]]
        distance = ((data - codes[0]) ** 2).sum(dim=1)
        for _ in range(1, self.size):
            if distance.sum() <= 0:  # fewer distinct patches than codes
                index = torch.randint(len(data), (1,), generator=generator)[0]
            else:
                index = torch.multinomial(distance, 1, generator=generator)[0]
            codes.append(data[index])
            distance = torch.minimum(distance, ((data - data[index]) ** 2).sum(dim=1))
        return torch.stack(codes)

    @torch.no_grad()
    def encode(self, patches: torch.Tensor) -> torch.Tensor:
        """(..., p*p*C) patches -> (...) token ids of the nearest code."""
        flat = normalize_patches(patches.float()).reshape(-1, patches.shape[-1])
        ids = torch.cdist(flat, self.codes).argmin(dim=1)
        return ids.reshape(patches.shape[:-1])
