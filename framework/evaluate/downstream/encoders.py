"""A pretrained run's encoder as one module for downstream use: a labelled batch -> (B, D).

Every modality the framework pretrains: a text transformer (the mean over tokens; ``pooling:
last``: the end token's state, the only one a causal model lets see the whole text; measured on
the standard library's packages with the tiny GPT, the mean is the better probe: 0.78 vs 0.68), a vision backbone (CLIP's image tower too) and a
speech encoder (the mean over valid frames). The same class serves the frozen modes (features)
and fine-tuning (the whole network trains), and, built without weights, the from-scratch
baseline. ``layer_of`` numbers parameters for layer-wise learning-rate decay (MAE's recipe):
embeddings 0, block i i+1, the final norm (and a head) ``num_layers + 1``.
"""
from __future__ import annotations

import re
from typing import Any, Dict

import torch
from torch import nn

from framework.config.schema import RunConfig
from framework.errors import ConfigError

TEXT_OBJECTIVES = ("clm", "mlm")
AUDIO_OBJECTIVES = ("wav2vec2", "hubert")
POOLINGS = ("mean", "last")


def modality_of(objective: str) -> str:
    if objective in TEXT_OBJECTIVES:
        return "text"
    if objective in AUDIO_OBJECTIVES:
        return "audio"
    if objective == "finetune":
        raise ConfigError("the checkpoint is a fine-tuned run: give the pretrained run it started from")
    return "image"


class DownstreamEncoder(nn.Module):
    """``forward(batch)``: a collated labelled batch (``image``, ``wave``/``length`` or
    ``tokens``/``valid``) -> pooled features (B, feature_dim)."""

    def __init__(self, core: nn.Module, modality: str, pooling: str = "mean", pad_id: int = 0) -> None:
        super().__init__()
        self.core, self.modality, self.pooling, self.pad_id = core, modality, pooling, pad_id
        self.feature_dim = int(getattr(core, "feature_dim", 0) or core.cfg.dim)
        layers = getattr(core, "blocks", None)
        self.num_layers = len(layers) if layers is not None else len(getattr(core, "stages", []))

    def forward(self, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.modality == "image":
            from framework.augment import to_float_images

            return self.core(to_float_images(batch["image"]))
        if self.modality == "audio":
            return self.core(batch["wave"], batch["length"])
        valid = batch["valid"]
        hidden = self.core(batch["tokens"], valid)
        if self.pooling == "last":  # the end-of-text token: the only one a causal model lets see every other
            last = valid.long().sum(1).clamp(min=1) - 1
            return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        weights = valid[..., None].to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)

    def layer_of(self, name: str) -> int:
        """The layer-decay index of parameter ``name`` (relative to this module)."""
        found = re.search(r"(?:^|\.)(?:blocks|stages)\.(\d+)\.", name)
        if found:
            return int(found.group(1)) + 1
        if re.match(r"core\.norm\.", name):
            return self.num_layers + 1
        return 0


def build_encoder(pretrained: RunConfig, pooling: str = "mean") -> DownstreamEncoder:
    """The network of run config ``pretrained``, randomly initialised (seeded by the caller)."""
    name = pretrained.objective.name
    modality = modality_of(name)
    if modality == "text":
        if pooling not in POOLINGS:
            raise ConfigError(f"objective.pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
        from framework.models.transformer import Transformer
        from framework.objectives.text_common import tokenizer_facts

        vocab_size, special = tokenizer_facts(pretrained)
        core = Transformer(pretrained.model, vocab_size, causal=name == "clm")
        return DownstreamEncoder(core, "text", pooling, special["pad"])
    if modality == "audio":
        from framework.objectives.audio_common import build_encoder as build_audio_encoder

        return DownstreamEncoder(build_audio_encoder(pretrained), "audio")
    from framework.objectives.vision_common import build_backbone

    return DownstreamEncoder(build_backbone(pretrained), "image")


def load_pretrained_weights(encoder: DownstreamEncoder, checkpoint: Any) -> None:
    """Copy a checkpoint's pretrained weights into ``encoder.core`` (built by ``build_encoder``)."""
    if encoder.modality == "text":
        from framework.evaluate.backbone import read_run_weights

        state = {k[len("model."):]: v for k, v in read_run_weights(checkpoint, key="--checkpoint").items()
                 if k.startswith("model.")}
    else:
        from framework.evaluate.backbone import load_backbone

        state = load_backbone(checkpoint).state_dict()
    missing, unexpected = encoder.core.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"{checkpoint}: the checkpoint lacks encoder weights {missing[:3]}")


def pretrained_encoder(checkpoint: Any, pooling: str = "mean") -> tuple[DownstreamEncoder, RunConfig]:
    """(the checkpoint's encoder with its weights, in eval mode; the run's config)."""
    from framework.evaluate.backbone import read_run_config, resolve_checkpoint

    path = resolve_checkpoint(checkpoint, key="--checkpoint")
    cfg = read_run_config(path, key="--checkpoint")
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG stream
        encoder = build_encoder(cfg, pooling)
    load_pretrained_weights(encoder, path)
    return encoder.eval(), cfg
