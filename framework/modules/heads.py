"""Projection and prediction MLPs of the joint-embedding methods (SimCLR, MoCo v3, BYOL, DINO)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    layers: int = 2,
    batch_norm: bool = True,
    last_batch_norm: bool = False,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """``layers`` Linear layers; between them BatchNorm (optional) and the activation.

    ``last_batch_norm`` adds an affine-free BatchNorm after the output (MoCo v3's projector).
    Hidden linears have no bias when a BatchNorm follows (it would be cancelled)."""
    if layers < 1:
        raise ValueError(f"an MLP needs at least 1 layer, got {layers}")
    modules: list[nn.Module] = []
    dim = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(activation())
        dim = hidden_dim
    modules.append(nn.Linear(dim, out_dim, bias=not last_batch_norm))
    if last_batch_norm:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class DINOHead(nn.Module):
    """DINO's head: a GELU MLP to a bottleneck, l2-normalisation, then a weight-normalised
    linear layer to ``out_dim`` prototypes whose norm is fixed to 1 (Caron et al. 2021, Sec. 3.1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, layers: int = 3,
                 batch_norm: bool = False) -> None:
        super().__init__()
        self.mlp = mlp(in_dim, hidden_dim, bottleneck_dim, layers, batch_norm=batch_norm, activation=nn.GELU)
        self.mlp.apply(_trunc_normal_init)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        # weight_norm's magnitude g is frozen at 1: only directions of the prototypes are learned.
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        self.last_layer.parametrizations.weight.original0.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


def _trunc_normal_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
