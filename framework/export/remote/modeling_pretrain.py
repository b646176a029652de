"""A pretrain-framework transformer (``framework/models/transformer.py``) for transformers'
remote-code loading: the same modules under the same parameter names, so the exported weights
load as they are. Self-contained: it needs torch and transformers alone.

Pre-norm blocks with rotary (``rotate_half``) or learned positions, LayerNorm or RMSNorm, a GELU
or SwiGLU MLP, attention without bias that never reads padding (``attention_mask``), a final
norm and a (tied) output projection. Bidirectional unless ``config.causal``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_pretrain import PretrainTransformerConfig


def _rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[: x.shape[-2]].to(x.dtype), sin[: x.shape[-2]].to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def _norm(kind: str, dim: int) -> nn.Module:
    return nn.LayerNorm(dim) if kind == "layernorm" else nn.RMSNorm(dim, eps=1e-5)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x, rotary, mask):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        if rotary is not None:
            q, k = _rotate(q, *rotary), _rotate(k, *rotary)
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    def __init__(self, config: PretrainTransformerConfig) -> None:
        super().__init__()
        dim, hidden = config.dim, int(config.dim * config.mlp_ratio)
        self.norm1 = _norm(config.norm, dim)
        self.attn = Attention(dim, config.heads, config.causal)
        self.norm2 = _norm(config.norm, dim)
        if config.mlp == "gelu":
            self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim), nn.Dropout(0.0))
        else:
            self.mlp = SwiGLU(dim, hidden)

    def forward(self, x, rotary, mask):
        x = x + self.attn(self.norm1(x), rotary, mask)
        return x + self.mlp(self.norm2(x))


class Transformer(nn.Module):
    def __init__(self, config: PretrainTransformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.pos_embed = nn.Embedding(config.max_seq_len, config.dim) if config.position == "learned" else None
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.norm = _norm(config.norm, config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.position == "rope":
            cos, sin = _rotary_tables(config.max_seq_len, config.dim // config.heads)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens, valid=None):
        length = tokens.shape[1]
        x = self.embed(tokens)
        rotary = None
        if self.pos_embed is not None:
            x = x + self.pos_embed(torch.arange(length, device=tokens.device))
        else:
            rotary = (self.rope_cos, self.rope_sin)
        mask = None
        if valid is not None:
            mask = valid[:, None, None, :].bool()
            if self.config.causal:
                mask = mask & torch.ones(length, length, dtype=torch.bool, device=tokens.device).tril()
        for block in self.blocks:
            x = block(x, rotary, mask)
        return self.norm(x)


class PretrainTransformerForMaskedLM(PreTrainedModel):
    """Token ids (and ``attention_mask``) -> logits over the vocabulary at every position;
    with ``labels`` (-100 where not masked), the masked-token cross-entropy."""

    config_class = PretrainTransformerConfig
    base_model_prefix = "model"
    _tied_weights_keys = {"model.head.weight": "model.embed.weight"}

    def __init__(self, config: PretrainTransformerConfig) -> None:
        super().__init__(config)
        self.model = Transformer(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.model.head

    def set_output_embeddings(self, new: nn.Module) -> None:
        self.model.head = new

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, Transformer) and module.pos_embed is None:  # rebuilt after a meta-device init
            cos, sin = _rotary_tables(module.config.max_seq_len, module.config.dim // module.config.heads)
            module.rope_cos, module.rope_sin = cos.to(module.embed.weight.device), sin.to(module.embed.weight.device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs) -> MaskedLMOutput:
        valid = attention_mask.bool() if attention_mask is not None else None
        logits = self.model.head(self.model(input_ids, valid))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)
