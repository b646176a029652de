"""``load_backbone(path)``: the pretrained image backbone of a vision run, as a plain nn.Module.

A checkpoint holds the run's resolved config (``hyper_parameters.config``, saved by every
objective) and the objective's weights. The objective named there is rebuilt, its weights
loaded, and the backbone it exports (``Objective.export_backbone``: the online encoder, or
DINO's teacher) is copied into a fresh ``framework.models`` backbone: plain BatchNorm, no
heads, no augmentation, eval mode. It maps (N, C, H, W) floats in [0, 1] to (N, D).

Every checkpoint format of the strategy layer is read (``framework.training.consolidate``):
a Lightning ``.ckpt`` file (ddp, single device), an FSDP or DeepSpeed checkpoint directory
(gathered into full weights in this process), or a ``.safetensors`` file written by
``pretrain consolidate``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

import torch
from torch import nn

from framework.errors import ConfigError


def _read_checkpoint(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(resolved run config as a dict, the objective's full state dict) from any supported format."""
    from framework.training.consolidate import load_consolidated, read_full_weights

    try:
        state, hparams = load_consolidated(path) if path.suffix == ".safetensors" else read_full_weights(path)
    except ConfigError:
        raise
    except Exception as exc:  # torch.load / safetensors / DCP raise many types for unreadable files
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from None
    config = hparams.get("config")
    if not isinstance(config, dict):
        raise ConfigError(f"{path} is not a checkpoint of a framework run (no hyper_parameters.config)")
    return config, state


def load_backbone(checkpoint_path: str | Path) -> nn.Module:
    """The pretrained backbone of a vision objective's checkpoint, in eval mode on the CPU."""
    from framework.config.load import config_from_dict
    from framework.objectives import objective_module
    from framework.objectives.vision_common import build_backbone

    path = Path(checkpoint_path)
    if not path.exists():
        raise ConfigError(f"checkpoint not found: {path}")
    config, state = _read_checkpoint(path)
    cfg = config_from_dict(config)
    module = objective_module(cfg.objective.name)
    if not hasattr(module.Objective, "export_backbone"):
        raise ConfigError(f"{path}: objective '{cfg.objective.name}' is not a vision objective (it has no image backbone)")
    objective = module.Objective(config)
    exported = objective.export_backbone()
    prefix = next(name for name, child in objective.named_children() if child is exported) + "."
    # Sharded formats may leave out state the backbone does not need (optimizer-only or head
    # buffers); what the exported backbone needs must all be there.
    missing, _ = objective.load_state_dict(state, strict=False)
    missing = [key for key in missing if key.startswith(prefix)]
    if missing:
        raise ConfigError(f"{path}: the checkpoint lacks backbone weights {missing[:3]}")
    backbone = build_backbone(cfg)
    backbone.load_state_dict(exported.state_dict())
    backbone.image_size = cfg.data.image_size  # the resolution it was pretrained at (features hold best there)
    return backbone.eval()
