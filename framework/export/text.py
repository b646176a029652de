"""Text models to Hugging Face transformers, native classes only (no ``trust_remote_code``),
with the tokenizer. A causal LM of either layout of ``framework.models.transformer``:

* ``model.norm=layernorm, model.mlp=gelu`` -> ``GPTNeoXForCausalLM``: rotary on the whole head,
  ``rotate_half`` pairs (i, i + head_dim/2), sequential pre-norm residual with LayerNorm, exact
  GELU, biased MLP, attention without bias. The one difference is the fused QKV projection's
  row order: ours is (q | k | v) each over all heads, NeoX's is per head (q_h, k_h, v_h); the
  rows are permuted, nothing is approximated.
* ``model.norm=rmsnorm, model.mlp=swiglu`` -> ``LlamaForCausalLM`` (separate q/k/v/o and
  gate/up/down projections, no biases): the format most tools load.

Anything else (learned positions, a mixed layout) is refused, naming the key; ``--format
safetensors`` and ``onnx`` still export it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from framework.errors import ConfigError
from framework.text.tokenizer import SPECIAL_TOKENS, load_tokenizer, special_token_ids


LAYOUTS = {("layernorm", "gelu"): "GPTNeoXForCausalLM", ("rmsnorm", "swiglu"): "LlamaForCausalLM"}


def check_causal_lm(cfg: Any) -> str:
    """The native transformers class of this config; ConfigError naming the key if none."""
    model = cfg.model
    if model.position != "rope":
        raise ConfigError(
            f"model.position={model.position}: GPT-NeoX and Llama (the transformers classes text exports to) use rotary "
            "positions; export --format safetensors or onnx instead"
        )
    layout = (model.norm, model.mlp)
    if layout not in LAYOUTS:
        raise ConfigError(
            f"model.norm={model.norm} with model.mlp={model.mlp}: no native transformers class has this layout "
            "(layernorm + gelu is GPT-NeoX, rmsnorm + swiglu is Llama); export --format safetensors or onnx instead"
        )
    return LAYOUTS[layout]


def _common(cfg: Any, vocab_size: int, special: Dict[str, int]) -> Dict[str, Any]:
    model = cfg.model
    return dict(
        vocab_size=vocab_size, hidden_size=model.dim, num_hidden_layers=model.depth, num_attention_heads=model.heads,
        intermediate_size=int(model.dim * model.mlp_ratio), max_position_embeddings=model.max_seq_len,
        attention_bias=False, tie_word_embeddings=bool(model.tie_embeddings), attention_dropout=0.0,
        bos_token_id=special["eos"],  # one separator: documents are joined by end-of-text
        eos_token_id=special["eos"], pad_token_id=special["pad"],
    )


def llama_config(cfg: Any, vocab_size: int, special: Dict[str, int]) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        **_common(cfg, vocab_size, special), num_key_value_heads=cfg.model.heads, head_dim=cfg.model.dim // cfg.model.heads,
        hidden_act="silu", rms_norm_eps=1e-5, mlp_bias=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, architectures=["LlamaForCausalLM"],
    )


def llama_state_dict(state: Dict[str, torch.Tensor], cfg: Any) -> Dict[str, torch.Tensor]:
    """Our ``model.*`` weights under Llama's names: the fused QKV split into q, k and v."""
    dim = cfg.model.dim
    out = {
        "model.embed_tokens.weight": state["model.embed.weight"],
        "model.norm.weight": state["model.norm.weight"],
        "lm_head.weight": state["model.head.weight"],
    }
    for i in range(cfg.model.depth):
        ours, theirs = f"model.blocks.{i}.", f"model.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split(dim)
        out.update({
            theirs + "input_layernorm.weight": state[ours + "norm1.weight"],
            theirs + "self_attn.q_proj.weight": q,
            theirs + "self_attn.k_proj.weight": k,
            theirs + "self_attn.v_proj.weight": v,
            theirs + "self_attn.o_proj.weight": state[ours + "attn.proj.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
            theirs + "mlp.gate_proj.weight": state[ours + "mlp.gate.weight"],
            theirs + "mlp.up_proj.weight": state[ours + "mlp.up.weight"],
            theirs + "mlp.down_proj.weight": state[ours + "mlp.down.weight"],
        })
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def neox_config(cfg: Any, vocab_size: int, special: Dict[str, int]) -> Any:
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(
        **_common(cfg, vocab_size, special),
        hidden_act="gelu",  # exact (erf) GELU, as torch.nn.GELU()
        layer_norm_eps=1e-5, use_parallel_residual=False, hidden_dropout=0.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
        architectures=["GPTNeoXForCausalLM"],
    )


def neox_state_dict(state: Dict[str, torch.Tensor], cfg: Any) -> Dict[str, torch.Tensor]:
    """Our ``model.*`` weights under GPT-NeoX's names and layout."""
    model = cfg.model
    head_dim = model.dim // model.heads
    out = {
        "gpt_neox.embed_in.weight": state["model.embed.weight"],
        "gpt_neox.final_layer_norm.weight": state["model.norm.weight"],
        "gpt_neox.final_layer_norm.bias": state["model.norm.bias"],
        "lm_head.weight": state["model.head.weight"],
    }
    for i in range(model.depth):
        ours, theirs = f"model.blocks.{i}.", f"gpt_neox.layers.{i}."
        qkv = state[ours + "attn.qkv.weight"]  # rows (3, heads, head_dim) -> (heads, 3, head_dim)
        qkv = qkv.view(3, model.heads, head_dim, model.dim).transpose(0, 1).reshape(3 * model.dim, model.dim)
        out.update({
            theirs + "input_layernorm.weight": state[ours + "norm1.weight"],
            theirs + "input_layernorm.bias": state[ours + "norm1.bias"],
            theirs + "attention.query_key_value.weight": qkv,
            theirs + "attention.dense.weight": state[ours + "attn.proj.weight"],
            theirs + "post_attention_layernorm.weight": state[ours + "norm2.weight"],
            theirs + "post_attention_layernorm.bias": state[ours + "norm2.bias"],
            theirs + "mlp.dense_h_to_4h.weight": state[ours + "mlp.0.weight"],
            theirs + "mlp.dense_h_to_4h.bias": state[ours + "mlp.0.bias"],
            theirs + "mlp.dense_4h_to_h.weight": state[ours + "mlp.2.weight"],
            theirs + "mlp.dense_4h_to_h.bias": state[ours + "mlp.2.bias"],
        })
    return {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in out.items()}


def save_tokenizer(tokenizer_path: str, directory: Path) -> None:
    """The run's BPE tokenizer as a transformers fast tokenizer with its special tokens set,
    so ``AutoTokenizer.from_pretrained(directory)`` gives our ids."""
    from transformers import PreTrainedTokenizerFast

    eos, pad, mask = SPECIAL_TOKENS
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=load_tokenizer(tokenizer_path), bos_token=eos, eos_token=eos, pad_token=pad, mask_token=mask,
    )
    tokenizer.save_pretrained(str(directory))


def export_causal_lm(objective: Any, directory: Path) -> Dict[str, Any]:
    """Write config.json, model.safetensors and the tokenizer of a CLM objective into ``directory``."""
    import transformers

    cfg = objective.cfg
    architecture = check_causal_lm(cfg)
    special = special_token_ids(load_tokenizer(cfg.data.tokenizer))
    llama = architecture == "LlamaForCausalLM"
    config = (llama_config if llama else neox_config)(cfg, objective.model.vocab_size, special)
    weights = (llama_state_dict if llama else neox_state_dict)(objective.state_dict(), cfg)
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, architecture)(config)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConfigError(f"export: the {architecture} mapping left out {missing[:3]} / unexpected {unexpected[:3]}")
    model.save_pretrained(str(directory))  # safetensors, with the `format: pt` metadata transformers reads
    save_tokenizer(cfg.data.tokenizer, directory)
    return {"architecture": architecture, "auto_class": "AutoModelForCausalLM"}


REMOTE_FILES = ("configuration_pretrain.py", "modeling_pretrain.py")


def export_masked_lm(objective: Any, directory: Path) -> Dict[str, Any]:
    """An MLM objective as a remote-code transformers model (``trust_remote_code=True``): no
    native transformers encoder has our pre-norm layout with rotary positions (BERT and RoBERTa
    are post-norm with learned positions, RoFormer post-norm, ModernBERT normalises its
    embeddings and has a GLU-only MLP and a head transform), so the directory carries a
    self-contained copy of our transformer (``framework/export/remote/``: torch and
    transformers alone) under our parameter names."""
    import shutil

    from framework.export.remote.configuration_pretrain import PretrainTransformerConfig
    from framework.export.remote.modeling_pretrain import PretrainTransformerForMaskedLM

    cfg, model_cfg = objective.cfg, objective.cfg.model
    special = special_token_ids(load_tokenizer(cfg.data.tokenizer))
    config = PretrainTransformerConfig(
        vocab_size=objective.model.vocab_size, dim=model_cfg.dim, depth=model_cfg.depth, heads=model_cfg.heads,
        mlp_ratio=model_cfg.mlp_ratio, max_seq_len=model_cfg.max_seq_len, position=model_cfg.position, norm=model_cfg.norm,
        mlp=model_cfg.mlp, causal=False, tie_word_embeddings=bool(model_cfg.tie_embeddings),
        pad_token_id=special["pad"], eos_token_id=special["eos"], bos_token_id=special["eos"],
        architectures=["PretrainTransformerForMaskedLM"],
        auto_map={"AutoConfig": "configuration_pretrain.PretrainTransformerConfig",
                  "AutoModelForMaskedLM": "modeling_pretrain.PretrainTransformerForMaskedLM"},
    )
    with torch.random.fork_rng(devices=[]):
        model = PretrainTransformerForMaskedLM(config)
    weights = {k: v.detach().float().contiguous().clone() for k, v in objective.state_dict().items() if k.startswith("model.")}
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "model.head.weight")]
    if missing or unexpected:
        raise ConfigError(f"export: the remote-code mapping left out {missing[:3]} / unexpected {unexpected[:3]}")
    model.save_pretrained(str(directory))
    for name in REMOTE_FILES:
        shutil.copy2(Path(__file__).parent / "remote" / name, directory / name)
    save_tokenizer(cfg.data.tokenizer, directory)
    return {"architecture": "PretrainTransformerForMaskedLM (remote code)", "auto_class": "AutoModelForMaskedLM",
            "trust_remote_code": True}
