"""The config of a pretrain-framework transformer, for transformers' remote-code loading
(``trust_remote_code=True``). Self-contained: it needs transformers alone."""
from transformers import PretrainedConfig


class PretrainTransformerConfig(PretrainedConfig):
    model_type = "pretrain_transformer"

    def __init__(self, vocab_size: int = 512, dim: int = 256, depth: int = 4, heads: int = 4, mlp_ratio: float = 4.0,
                 max_seq_len: int = 1024, position: str = "rope", norm: str = "layernorm", mlp: str = "gelu",
                 causal: bool = False, tie_word_embeddings: bool = True, **kwargs) -> None:
        self.vocab_size, self.dim, self.depth, self.heads, self.mlp_ratio = vocab_size, dim, depth, heads, mlp_ratio
        self.max_seq_len, self.position, self.norm, self.mlp, self.causal = max_seq_len, position, norm, mlp, causal
        self.hidden_size, self.num_hidden_layers, self.num_attention_heads = dim, depth, heads
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
