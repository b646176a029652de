"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

Images (N, C, H, W) in [0, 1] -> features (N, dim). Patches are embedded by a strided
convolution, positions are fixed 2-D sine-cosine embeddings (MAE, MoCo v3) computed for
whatever grid the input has, so crops of any size divisible by the patch size work
(DINO's local crops) without interpolating a learned table. The blocks are the project's
pre-norm ``TransformerBlock`` without a causal mask. Features are the mean of the patch
tokens (``pool: mean``), the class token (``pool: cls``), or the patch tokens averaged over a
``pool_grid`` x ``pool_grid`` grid of the image and concatenated (``pool: grid``: keeps where
things are, which a linear probe of tiny images needs; the size is fixed whatever the crop),
after the final LayerNorm.

Masked-image objectives use the pieces: ``embed`` (patch tokens, no positions),
``positions``, ``encode`` (class token + blocks + norm on any token subset).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from framework.config.schema import ModelConfig
from framework.errors import ConfigError
from framework.models.transformer import TransformerBlock


@dataclass
class ViTConfig(ModelConfig):
    name: str = "vit"
    patch_size: int = 16
    dim: int = 192
    depth: int = 12
    heads: int = 3
    mlp_ratio: float = 4.0
    pool: str = "mean"  # mean (of patch tokens) | cls | grid (concatenated region means)
    pool_grid: int = 2  # pool: grid -> features of pool_grid^2 * dim
    dropout: float = 0.0
    # Input normalisation inside the model, so users feed plain [0, 1] images.
    mean: float = 0.5
    std: float = 0.25


def sincos_2d(grid_h: int, grid_w: int, dim: int, device: torch.device | None = None) -> torch.Tensor:
    """(grid_h * grid_w, dim) fixed 2-D sine-cosine position embeddings (MAE's ``get_2d_sincos_pos_embed``)."""
    if dim % 4:
        raise ConfigError(f"model.dim ({dim}) must be divisible by 4 for 2-D sine-cosine positions")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    ys, xs = torch.meshgrid(torch.arange(grid_h, dtype=torch.float32, device=device),
                            torch.arange(grid_w, dtype=torch.float32, device=device), indexing="ij")
    out_y = ys.flatten()[:, None] * omega[None]
    out_x = xs.flatten()[:, None] * omega[None]
    return torch.cat([out_x.sin(), out_x.cos(), out_y.sin(), out_y.cos()], dim=1)


class ViT(nn.Module):
    repeated_blocks = (TransformerBlock,)

    def __init__(self, cfg: ViTConfig, channels: int) -> None:
        super().__init__()
        if cfg.pool not in ("mean", "cls", "grid"):
            raise ConfigError(f"model.pool must be 'mean', 'cls' or 'grid', not {cfg.pool!r}")
        if cfg.pool == "grid" and cfg.pool_grid < 1:
            raise ConfigError(f"model.pool_grid must be >= 1, got {cfg.pool_grid}")
        if cfg.dim % cfg.heads:
            raise ConfigError(f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})")
        if cfg.patch_size < 1:
            raise ConfigError(f"model.patch_size must be >= 1, got {cfg.patch_size}")
        self.cfg, self.channels, self.patch_size = cfg, channels, cfg.patch_size
        self.feature_dim = cfg.dim * (cfg.pool_grid**2 if cfg.pool == "grid" else 1)
        self.feature_map_dim = cfg.dim  # channels of feature_map()
        self.register_buffer("pixel_mean", torch.tensor(cfg.mean), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(cfg.std), persistent=False)
        self.patch_embed = nn.Conv2d(channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, causal=False) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.dim)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE / MoCo v3: xavier-uniform linears, the patch projection initialised like a linear.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    def grid(self, height: int, width: int) -> tuple[int, int]:
        p = self.patch_size
        if height % p or width % p:
            raise ConfigError(f"image size {height}x{width} is not divisible by model.patch_size={p}")
        return height // p, width // p

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> patch tokens (N, L, dim), without positions."""
        if images.shape[1] != self.channels:
            raise ValueError(f"the model expects {self.channels}-channel images, got shape {tuple(images.shape)}")
        self.grid(images.shape[-2], images.shape[-1])
        x = (images - self.pixel_mean) / self.pixel_std
        return self.patch_embed(x).flatten(2).transpose(1, 2)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """(1, L, dim) position embeddings for an image of height x width pixels."""
        gh, gw = self.grid(height, width)
        return sincos_2d(gh, gw, self.cfg.dim, self.cls_token.device).to(self.cls_token.dtype)[None]

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens with positions (N, L', dim) -> (N, 1 + L', dim): class token first, after blocks and norm."""
        x = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def pool(self, hidden: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """(N, 1 + L, dim) encoded tokens of a full ``grid`` of patches -> (N, feature_dim)."""
        if self.cfg.pool == "cls":
            return hidden[:, 0]
        if self.cfg.pool == "mean":
            return hidden[:, 1:].mean(dim=1)
        patches = hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], -1, *grid)
        return F.adaptive_avg_pool2d(patches, self.cfg.pool_grid).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2], images.shape[-1]
        tokens = self.embed(images) + self.positions(height, width)
        return self.pool(self.encode(tokens), self.grid(height, width))

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [0, 1] -> the encoded patch tokens as a (N, dim, H/p, W/p) map."""
        height, width = images.shape[-2], images.shape[-1]
        hidden = self.encode(self.embed(images) + self.positions(height, width))
        return hidden[:, 1:].transpose(1, 2).reshape(hidden.shape[0], self.cfg.dim, *self.grid(height, width))
