"""Representation health: RankMe, feature spread and teacher entropy separate a healthy
embedding from each way of collapsing (formulas checked on matrices whose answer is known)."""
from __future__ import annotations

import math

import torch

from framework.evaluate.health import feature_std, mean_entropy, rankme


def test_rankme_is_the_effective_rank():
    generator = torch.Generator().manual_seed(0)
    left = torch.linalg.qr(torch.randn(64, 64, generator=generator))[0]
    right = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0]
    for rank in (1, 4, 16):
        equal = left[:, :rank] @ right[:rank]  # orthonormal columns times orthonormal rows: `rank` singular values of 1
        assert abs(rankme(equal) - rank) < 1e-3 * rank, rank
    spread = torch.randn(512, 32, generator=generator)
    assert 28 < rankme(spread) <= 32
    assert rankme(torch.ones(512, 32) + 1e-9 * spread) < 1.01  # every sample the same point: rank 1


def test_feature_std_is_one_when_spread_and_zero_when_collapsed():
    generator = torch.Generator().manual_seed(1)
    assert abs(feature_std(torch.randn(4096, 64, generator=generator)) - 1) < 0.02
    assert feature_std(torch.ones(100, 64) * 3) < 1e-9
    assert feature_std(torch.rand(100, 1, generator=generator).expand(100, 64) + 0.1) < 1e-6  # one ray: one point once normalised


def test_teacher_entropy_spans_one_hot_to_uniform():
    assert mean_entropy(torch.eye(8)) < 1e-6
    assert abs(mean_entropy(torch.full((5, 8), 1 / 8)) - math.log(8)) < 1e-9
