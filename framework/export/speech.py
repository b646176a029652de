"""Speech encoders to Hugging Face transformers: wav2vec 2.0 -> ``Wav2Vec2Model``, HuBERT ->
``HubertModel``, native (``AutoModel`` loads them), with a feature-extractor config.

transformers' "stable layer norm" variant (``do_stable_layer_norm=True``, wav2vec 2.0 Large's)
is our encoder with ``model.input_norm=false``: the same convolutions (group norm on the first
layer, or layer norm on every one), feature projection, weight-normalised position convolution,
pre-norm blocks and final norm. Our attention has no biases (zero biases there). With
``model.input_norm=true`` (the default, which normalises after adding the position convolution)
no transformers class reproduces the encoder, and the export names that key. The group norm's
statistics are over every frame there and over valid frames here: equal for unpadded input,
which is how transformers' feature extractor feeds the base models (no attention mask).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict

import torch

from framework.errors import ConfigError

ARCHITECTURES = {"wav2vec2": "Wav2Vec2Model", "hubert": "HubertModel"}


def check_speech(cfg: Any) -> str:
    if cfg.model.input_norm:
        raise ConfigError(
            "model.input_norm=true: transformers' Wav2Vec2 and Hubert have no LayerNorm after the position convolution "
            "in their pre-norm layout; train with model.input_norm=false to export to them, or export --format "
            "safetensors (load_backbone) or onnx"
        )
    return ARCHITECTURES[cfg.objective.name]


def _config(cfg: Any, architecture: str) -> Any:
    import transformers

    m = cfg.model
    dims, kernels, strides = zip(*[(int(d), int(k), int(s)) for d, k, s in m.conv_layers])
    config_class = getattr(transformers, architecture.replace("Model", "Config"))
    return config_class(
        hidden_size=m.dim, num_hidden_layers=m.depth, num_attention_heads=m.heads, intermediate_size=int(m.dim * m.mlp_ratio),
        hidden_act="gelu", layer_norm_eps=1e-5, conv_dim=list(dims), conv_kernel=list(kernels), conv_stride=list(strides),
        conv_bias=bool(m.conv_bias), feat_extract_norm="group" if m.conv_mode == "group_norm" else "layer",
        feat_extract_activation="gelu", num_conv_pos_embeddings=m.pos_conv_kernel,
        num_conv_pos_embedding_groups=m.pos_conv_groups, do_stable_layer_norm=True, feat_proj_layer_norm=True,
        hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0,
        architectures=[architecture],  # spec-augment (mask_time_prob) masks in train mode only, with our mask embedding
    )


def _weights(encoder: Any, cfg: Any) -> Dict[str, torch.Tensor]:
    m, state = cfg.model, encoder.state_dict()
    out = {
        "masked_spec_embed": state["mask_embedding"],
        "feature_projection.layer_norm.weight": state["feature_norm.weight"],
        "feature_projection.layer_norm.bias": state["feature_norm.bias"],
        "feature_projection.projection.weight": state["projection.weight"],
        "feature_projection.projection.bias": state["projection.bias"],
        "encoder.pos_conv_embed.conv.bias": state["position.conv.bias"],
        "encoder.pos_conv_embed.conv.parametrizations.weight.original0": state["position.conv.parametrizations.weight.original0"],
        "encoder.pos_conv_embed.conv.parametrizations.weight.original1": state["position.conv.parametrizations.weight.original1"],
        "encoder.layer_norm.weight": state["norm.weight"],
        "encoder.layer_norm.bias": state["norm.bias"],
    }
    for i in range(len(m.conv_layers)):
        theirs = f"feature_extractor.conv_layers.{i}."
        out[theirs + "conv.weight"] = state[f"feature_encoder.convs.{i}.weight"]
        if m.conv_bias:
            out[theirs + "conv.bias"] = state[f"feature_encoder.convs.{i}.bias"]
        if f"feature_encoder.norms.{i}.weight" in state:
            out[theirs + "layer_norm.weight"] = state[f"feature_encoder.norms.{i}.weight"]
            out[theirs + "layer_norm.bias"] = state[f"feature_encoder.norms.{i}.bias"]
    for i in range(m.depth):
        ours, theirs = f"blocks.{i}.", f"encoder.layers.{i}."
        q, k, v = state[ours + "attn.qkv.weight"].split(m.dim)
        out.update({
            theirs + "layer_norm.weight": state[ours + "norm1.weight"],
            theirs + "layer_norm.bias": state[ours + "norm1.bias"],
            theirs + "attention.q_proj.weight": q, theirs + "attention.q_proj.bias": torch.zeros(m.dim),
            theirs + "attention.k_proj.weight": k, theirs + "attention.k_proj.bias": torch.zeros(m.dim),
            theirs + "attention.v_proj.weight": v, theirs + "attention.v_proj.bias": torch.zeros(m.dim),
            theirs + "attention.out_proj.weight": state[ours + "attn.proj.weight"],
            theirs + "attention.out_proj.bias": torch.zeros(m.dim),
            theirs + "final_layer_norm.weight": state[ours + "norm2.weight"],
            theirs + "final_layer_norm.bias": state[ours + "norm2.bias"],
            theirs + "feed_forward.intermediate_dense.weight": state[ours + "mlp.0.weight"],
            theirs + "feed_forward.intermediate_dense.bias": state[ours + "mlp.0.bias"],
            theirs + "feed_forward.output_dense.weight": state[ours + "mlp.2.weight"],
            theirs + "feed_forward.output_dense.bias": state[ours + "mlp.2.bias"],
        })
    return {k: v.detach().float().contiguous().clone() for k, v in out.items()}


def export_speech_hf(objective: Any, directory: Path) -> Dict[str, Any]:
    import transformers

    cfg = objective.cfg
    architecture = check_speech(cfg)
    config = _config(cfg, architecture)
    with torch.random.fork_rng(devices=[]):
        model = getattr(transformers, architecture)(config)
    missing, unexpected = model.load_state_dict(_weights(objective.export_backbone(), cfg), strict=False)
    if missing or unexpected:
        raise ConfigError(f"export: the {architecture} mapping left out {missing[:3]} / unexpected {unexpected[:3]}")
    model.save_pretrained(str(directory))
    # Raw 16-bit-range floats in, normalised per clip (zero mean, unit variance), as our loader does.
    transformers.Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=int(cfg.data.sample_rate), padding_value=0.0, do_normalize=True,
        return_attention_mask=False,
    ).save_pretrained(str(directory))
    return {"architecture": architecture, "auto_class": "AutoModel"}
