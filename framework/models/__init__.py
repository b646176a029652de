"""Plain ``nn.Module`` models, free of any parallelism code.

``MODELS`` maps ``model.name`` to ``(module, config class name)``. Each model class declares
``repeated_blocks``: the module types a strategy may wrap or checkpoint one by one.
"""
from __future__ import annotations

import importlib

MODELS = {
    "transformer": ("framework.models.transformer", "TransformerConfig"),
    "vit": ("framework.models.vit", "ViTConfig"),
    "resnet": ("framework.models.resnet", "ResNetConfig"),
    "audio_encoder": ("framework.models.audio_encoder", "AudioEncoderConfig"),
}


def model_config_class(name: str) -> type:
    module, cls = MODELS[name]
    return getattr(importlib.import_module(module), cls)
