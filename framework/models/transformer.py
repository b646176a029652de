"""A pre-norm transformer for text: causal (GPT) or bidirectional (BERT) by a flag.

Plain PyTorch with no parallelism code: strategies find the repeated ``TransformerBlock``s
through ``Transformer.repeated_blocks``. Attention is ``F.scaled_dot_product_attention``
(fused kernels where the device has them); positions are rotary or learned.

Two layouts by config, each the layout of a native transformers class (``pretrain export``):
``norm=layernorm, mlp=gelu`` (biased LayerNorm and MLP: GPT-NeoX) and ``norm=rmsnorm,
mlp=swiglu`` (no biases: Llama, the format most tools load).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from framework.config.schema import ModelConfig


@dataclass
class TransformerConfig(ModelConfig):
    name: str = "transformer"
    dim: int = 256
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    max_seq_len: int = 1024
    position: str = "rope"  # rope | learned
    norm: str = "layernorm"  # layernorm | rmsnorm
    mlp: str = "gelu"  # gelu | swiglu (hidden = dim * mlp_ratio; Llama uses mlp_ratio 8/3)
    dropout: float = 0.0
    tie_embeddings: bool = True
    vocab_size: int = 0  # 0: taken from the tokenizer, rounded up to a multiple of 64
    # run.init_from with another tokenizer: carry the shared tokens' rows over by string (else refused)
    resize_vocab: bool = False


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of rotary position embeddings, shape (seq_len, head_dim / 2)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., :h/2], x[..., h/2:]) of x: (B, heads, T, head_dim)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float, causal: bool) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"model.dim ({dim}) must be divisible by model.heads ({heads})")
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        dropout = self.dropout if self.training else 0.0
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal, dropout_p=dropout)
        else:  # (B, 1, T|1, T) booleans, True = may attend; causality already folded in
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu")


def make_norm(kind: str, dim: int) -> nn.Module:
    if kind not in NORMS:
        raise ValueError(f"model.norm must be one of {', '.join(NORMS)}, not {kind!r}")
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim, eps=1e-5)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (Shazeer 2020, as in Llama)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class TransformerBlock(nn.Module):
    """Pre-norm: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, dropout: float, causal: bool,
                 norm: str = "layernorm", mlp: str = "gelu") -> None:
        super().__init__()
        if mlp not in MLPS:
            raise ValueError(f"model.mlp must be one of {', '.join(MLPS)}, not {mlp!r}")
        hidden = int(dim * mlp_ratio)
        self.norm1 = make_norm(norm, dim)
        self.attn = Attention(dim, heads, dropout, causal)
        self.norm2 = make_norm(norm, dim)
        if mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(dropout))
        else:
            self.mlp = SwiGLU(dim, hidden, dropout)

    @property
    def mlp_out(self) -> nn.Linear:
        """The MLP's output projection (scaled at init like the attention's)."""
        return self.mlp[2] if isinstance(self.mlp, nn.Sequential) else self.mlp.down

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rotary, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    """Token ids (B, T) -> hidden states (B, T, dim); ``logits`` maps them to the vocabulary."""

    repeated_blocks = (TransformerBlock,)

    def __init__(self, cfg: TransformerConfig, vocab_size: int, causal: bool) -> None:
        super().__init__()
        if cfg.position not in ("rope", "learned"):
            raise ValueError(f"model.position must be 'rope' or 'learned', not {cfg.position!r}")
        self.cfg, self.vocab_size, self.causal = cfg, vocab_size, causal
        self.embed = nn.Embedding(vocab_size, cfg.dim)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.dim) if cfg.position == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(cfg.dim, cfg.heads, cfg.mlp_ratio, cfg.dropout, causal, cfg.norm, cfg.mlp) for _ in range(cfg.depth)
        )
        self.norm = make_norm(cfg.norm, cfg.dim)
        self.head = nn.Linear(cfg.dim, vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        if cfg.position == "rope":
            cos, sin = rotary_tables(cfg.max_seq_len, cfg.dim // cfg.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        for block in self.blocks:  # GPT-2: scale residual projections by depth
            for proj in (block.attn.proj, block.mlp_out):
                nn.init.normal_(proj.weight, std=0.02 / math.sqrt(2 * cfg.depth))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """``valid`` (B, T) booleans, False at padding: no position attends to padding then
        (a bidirectional model would otherwise mix it into every token)."""
        length = tokens.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {length} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        x = self.embed(tokens)
        rotary = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(length, device=tokens.device))
        else:
            rotary = (self.rope_cos, self.rope_sin)
        x = self.drop(x)
        mask = None
        if valid is not None:
            mask = valid[:, None, None, :].bool()  # keys
            if self.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        for block in self.blocks:
            x = block(x, rotary, mask)
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.head(hidden)
