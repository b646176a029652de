"""A pre-norm transformer for text: causal (GPT) or bidirectional (BERT) by a flag.

Plain PyTorch with no parallelism code: strategies find the repeated ``TransformerBlock``s
through ``Transformer.repeated_blocks``. Attention is ``F.scaled_dot_product_attention``
(fused kernels where the device has them); positions are rotary or learned.
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
    dropout: float = 0.0
    tie_embeddings: bool = True
    vocab_size: int = 0  # 0: taken from the tokenizer, rounded up to a multiple of 64
