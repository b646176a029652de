"""Randomness that is a function of (seed, step, rank): what makes resumed runs exact.

Augmentations (kornia) and masking draw from torch's global generator, whose state a
Lightning checkpoint does not hold. Seeding it per batch from the run seed, the optimiser
step, the batch index and the rank makes a stopped-and-resumed run draw the same crops
and masks as an uninterrupted one, while every rank and step still differ.
"""
from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def step_seed(*parts: object) -> int:
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators (CPU, and ``device`` if CUDA) seeded by ``seed``;
    the previous generator states come back afterwards."""
    devices = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
