"""The wav2vec 2.0 / HuBERT audio encoder: raw waveform -> contextual frame features.

Baevski et al., "wav2vec 2.0", NeurIPS 2020 (arXiv:2006.11477), Sec. 2 and fairseq's
``wav2vec2.py``; HuBERT (Hsu et al. 2021) uses the same encoder.

* A stack of 1-D convolutions (``conv_layers``: [dim, kernel, stride] each; the default is
  Base's seven, 400 samples of receptive field and 320 of stride: 20 ms frames at 16 kHz) with
  GELU. ``conv_mode: group_norm`` normalises each channel of the first layer over time (Base),
  ``layer_norm`` normalises every layer's channels per frame (Large). The group norm here takes
  its statistics over the valid frames only, so padding never changes a clip's features.
* A feature projection (LayerNorm, Linear to ``dim``), a learned mask embedding (the
  objectives replace masked frames with it), a weight-normalised grouped convolution as the
  relative position embedding, and a bidirectional transformer whose attention never reads padding.

Frame lengths are computed from sample lengths (``frame_lengths``), so padding reaches neither
the encoder's statistics nor a loss. Plain PyTorch; strategies find the transformer blocks
through ``repeated_blocks``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig
from framework.models.transformer import TransformerBlock

BASE_CONV = [[512, 10, 5]] + [[512, 3, 2]] * 4 + [[512, 2, 2]] * 2
CONV_MODES = ("group_norm", "layer_norm")


@dataclass
class AudioEncoderConfig(ModelConfig):
    name: str = "audio_encoder"
    conv_layers: List[List[int]] = field(default_factory=lambda: [list(layer) for layer in BASE_CONV])
    conv_mode: str = "group_norm"  # group_norm (Base) | layer_norm (Large)
    conv_bias: bool = False
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    pos_conv_kernel: int = 128
    pos_conv_groups: int = 16
    # A LayerNorm after adding the position convolution (before the pre-norm blocks). Off, the
    # encoder is transformers' Wav2Vec2/Hubert "stable layer norm" layout exactly (`pretrain export`).
    input_norm: bool = True
    pool: str = "mean"  # features for probes and load_backbone: the mean over valid frames


def frame_lengths(lengths: torch.Tensor, conv_layers: List[List[int]]) -> torch.Tensor:
    """Frames each clip of ``lengths`` samples gives (frames that fit wholly in the clip)."""
    for _, kernel, stride in conv_layers:
        lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
    return lengths.clamp(min=0)


def receptive_field(conv_layers: List[List[int]]) -> tuple[int, int]:
    """(samples one frame sees, samples between frames)."""
    field, stride = 1, 1
    for _, kernel, step in conv_layers:
        field += (kernel - 1) * stride
        stride *= step
    return field, stride


def valid_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) booleans: True at the first ``lengths[b]`` positions."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class MaskedGroupNorm(nn.Module):
    """GroupNorm with one group per channel whose statistics are over the valid frames only."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:  # x (B, C, T), valid (B, T)
        weights = valid[:, None, :].to(x.dtype)
        count = weights.sum(-1, keepdim=True).clamp(min=1)
        mean = (x * weights).sum(-1, keepdim=True) / count
        var = ((x - mean) ** 2 * weights).sum(-1, keepdim=True) / count
        return (x - mean) / torch.sqrt(var + 1e-5) * self.weight[None, :, None] + self.bias[None, :, None]


class ConvFeatureEncoder(nn.Module):
    """(B, samples) -> (B, C, frames); padding zeroed at every layer."""

    def __init__(self, layers: List[List[int]], mode: str, bias: bool) -> None:
        super().__init__()
        if mode not in CONV_MODES:
            raise ValueError(f"model.conv_mode must be one of {', '.join(CONV_MODES)}, not {mode!r}")
        self.layers, self.mode = [list(map(int, layer)) for layer in layers], mode
        channels = 1
        self.convs, self.norms = nn.ModuleList(), nn.ModuleList()
        for index, (dim, kernel, stride) in enumerate(self.layers):
            self.convs.append(nn.Conv1d(channels, dim, kernel, stride, bias=bias))
            if mode == "layer_norm":
                self.norms.append(nn.LayerNorm(dim))
            elif index == 0:
                self.norms.append(MaskedGroupNorm(dim))
            channels = dim
        self.out_dim = channels
        for conv in self.convs:
            nn.init.kaiming_normal_(conv.weight)

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = wave[:, None, :]
        for index, (conv, (_, kernel, stride)) in enumerate(zip(self.convs, self.layers)):
            x = conv(x)
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            valid = valid_mask(lengths, x.shape[-1])
            if self.mode == "layer_norm":
                x = self.norms[index](x.transpose(1, 2)).transpose(1, 2)
            elif index == 0:
                x = self.norms[0](x, valid)
            x = F.gelu(x) * valid[:, None, :].to(x.dtype)  # padding stays zero for the next layer
        return x


class PositionalConv(nn.Module):
    """wav2vec 2.0's relative position embedding: a wide grouped convolution over frames."""

    def __init__(self, dim: int, kernel: int, groups: int) -> None:
        super().__init__()
        conv = nn.Conv1d(dim, dim, kernel, padding=kernel // 2, groups=groups)
        nn.init.normal_(conv.weight, mean=0.0, std=(4.0 / (kernel * dim)) ** 0.5)
        nn.init.zeros_(conv.bias)
        self.conv = nn.utils.parametrizations.weight_norm(conv, name="weight", dim=2)
        self.trim = 1 if kernel % 2 == 0 else 0  # an even kernel gives one frame too many

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, D)
        y = self.conv(x.transpose(1, 2))
        if self.trim:
            y = y[:, :, : -self.trim]
        return F.gelu(y).transpose(1, 2)


class AudioEncoder(nn.Module):
    """Waveforms (B, samples) + lengths -> frame features (B, frames, dim) and the frame mask.

    ``encode`` runs the convolutions only (what the quantizer and the feature penalty see);
    ``contextualize`` the rest, optionally with frames replaced by the mask embedding and with
    every layer's output (HuBERT's targets come from a middle layer)."""

    repeated_blocks = (TransformerBlock,)

    def __init__(self, cfg: AudioEncoderConfig) -> None:
        super().__init__()
        if cfg.dim % cfg.heads:
            raise ValueError(f"model.dim ({cfg.dim}) must be divisible by model.heads ({cfg.heads})")
        if cfg.pos_conv_groups < 1 or cfg.dim % cfg.pos_conv_groups:
            raise ValueError(f"model.dim ({cfg.dim}) must be divisible by model.pos_conv_groups ({cfg.pos_conv_groups})")
        self.cfg = cfg
        self.feature_encoder = ConvFeatureEncoder(cfg.conv_layers, cfg.conv_mode, cfg.conv_bias)
        conv_dim = self.feature_encoder.out_dim
        self.feature_norm = nn.LayerNorm(conv_dim)
        self.projection = nn.Linear(conv_dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.mask_embedding = nn.Parameter(torch.empty(cfg.dim).uniform_())
        self.position = PositionalConv(cfg.dim, cfg.pos_conv_kernel, cfg.pos_conv_groups)
        self.input_norm = nn.LayerNorm(cfg.dim) if cfg.input_norm else nn.Identity()
        self.blocks = nn.ModuleList(TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, causal=False)
                                    for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.conv_dim, self.feature_dim = conv_dim, cfg.dim

    def frame_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return frame_lengths(lengths, self.cfg.conv_layers)

    def encode(self, wave: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw conv features (B, T, C): the feature penalty's, valid frames (B, T)); their
        ``feature_norm`` is what the quantizer and ``contextualize`` take."""
        features = self.feature_encoder(wave, lengths).transpose(1, 2)
        return features, valid_mask(self.frame_lengths(lengths), features.shape[1])

    def contextualize(self, features: torch.Tensor, valid: torch.Tensor, mask: Optional[torch.Tensor] = None,
                      all_layers: bool = False) -> torch.Tensor | list[torch.Tensor]:
        """Normalised conv features -> transformer output (B, T, dim); ``mask`` (B, T) frames are
        replaced by the mask embedding; ``all_layers``: the input and every block's output, then
        the last (normalised)."""
        x = self.projection(features)
        if mask is not None:
            x = torch.where(mask[..., None], self.mask_embedding.to(x.dtype), x)
        x = x * valid[..., None].to(x.dtype)  # the position conv must see zeros where padding is
        x = self.input_norm(x + self.position(x))
        x = self.dropout(x)
        attend = valid[:, None, None, :]
        layers = [x]
        for block in self.blocks:
            x = block(x, None, attend)
            layers.append(x)
        x = self.norm(x)
        return [*layers[:-1], x] if all_layers else x

    def forward(self, wave: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What probes and ``load_backbone`` see: (B, dim), the mean over valid frames."""
        features, valid = self.encode(wave, lengths)
        return pooled(self.contextualize(self.feature_norm(features), valid), valid)


def pooled(frames: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    weights = valid[..., None].to(frames.dtype)
    return (frames * weights).sum(1) / weights.sum(1).clamp(min=1)
