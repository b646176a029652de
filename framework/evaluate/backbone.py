"""``load_backbone(path)``: the pretrained image backbone of a vision run, as a plain nn.Module;
``load_clip(path)``: a CLIP run's two towers with its tokenizer; ``load_objective``: any run's
objective, for evaluation and export, which read checkpoints through this module alone.

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


def read_checkpoint(path: Path) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(the objective's full state dict, its constructor arguments ``hyper_parameters``, whose
    ``config`` is the resolved run config) from any supported format."""
    from framework.training.consolidate import load_consolidated, read_full_weights

    try:
        state, hparams = load_consolidated(path) if path.suffix == ".safetensors" else read_full_weights(path)
    except ConfigError:
        raise
    except Exception as exc:  # torch.load / safetensors / DCP raise many types for unreadable files
        raise ConfigError(f"cannot read checkpoint {path}: {exc}") from None
    if not isinstance(hparams.get("config"), dict):
        raise ConfigError(f"{path} is not a checkpoint of a framework run (no hyper_parameters.config)")
    return state, hparams


def _read_checkpoint(path: Path) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(resolved run config as a dict, the objective's full state dict)."""
    state, hparams = read_checkpoint(path)
    return hparams["config"], state


def resolve_checkpoint(path: str | Path, key: str = "checkpoint") -> Path:
    """A run directory stands for its newest checkpoint; a checkpoint file or directory (FSDP,
    DeepSpeed) or a ``.safetensors`` file for itself. ``key`` names the option in errors."""
    from framework.training.checkpoint import CHECKPOINT_DIR, newest_checkpoint

    path = Path(path)
    if (path / CHECKPOINT_DIR).is_dir():
        newest = newest_checkpoint(path)
        if newest is None:
            raise ConfigError(f"{key}: run directory {path} has no checkpoint yet")
        return newest
    if not path.exists():
        raise ConfigError(f"{key}: checkpoint not found: {path}")
    return path


def read_run_config(path: str | Path, key: str = "checkpoint") -> Any:
    """The resolved run config (a RunConfig) a checkpoint (or run directory) was trained with."""
    from framework.config.load import config_from_dict

    return config_from_dict(_read_checkpoint(resolve_checkpoint(path, key))[0])


def read_run_weights(path: str | Path, key: str = "checkpoint") -> Dict[str, torch.Tensor]:
    """The full state dict of a checkpoint's (or run directory's) objective."""
    return _read_checkpoint(resolve_checkpoint(path, key))[1]


def load_objective(checkpoint_path: str | Path, key: str = "checkpoint") -> Any:
    """The objective (LightningModule) of a checkpoint or run directory, weights loaded, eval mode,
    on the CPU: the one loader evaluation and export read checkpoints through."""
    from framework.config.load import config_from_dict
    from framework.objectives import objective_module

    config, state = _read_checkpoint(resolve_checkpoint(checkpoint_path, key))
    cfg = config_from_dict(config)
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG stream
        objective = objective_module(cfg.objective.name).Objective(config)
    missing, _ = objective.load_state_dict(state, strict=False)
    if missing:
        raise ConfigError(f"{checkpoint_path}: the checkpoint lacks weights {missing[:3]}")
    return objective.eval()


def load_backbone(checkpoint_path: str | Path) -> nn.Module:
    """The pretrained backbone of a checkpoint (or a run directory's newest), in eval mode on the
    CPU: a vision objective's image backbone (images -> features), or a speech objective's audio
    encoder: (waveforms (B, samples) at its ``sample_rate``, normalised per clip, and their
    lengths) -> (B, dim), the mean of its frames; ``encode``/``contextualize`` give the frames."""
    from framework.config.load import config_from_dict
    from framework.objectives import objective_module

    path = resolve_checkpoint(checkpoint_path)
    config, state = _read_checkpoint(path)
    cfg = config_from_dict(config)
    module = objective_module(cfg.objective.name)
    if not hasattr(module.Objective, "export_backbone"):
        raise ConfigError(f"{path}: objective '{cfg.objective.name}' has no backbone to export")
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG stream
        objective = module.Objective(config)
    exported = objective.export_backbone()
    prefix = next(name for name, child in objective.named_children() if child is exported) + "."
    # Sharded formats may leave out state the backbone does not need (optimizer-only or head
    # buffers); what the exported backbone needs must all be there.
    missing, _ = objective.load_state_dict(state, strict=False)
    missing = [key for key in missing if key.startswith(prefix)]
    if missing:
        raise ConfigError(f"{path}: the checkpoint lacks backbone weights {missing[:3]}")
    if hasattr(exported, "contextualize"):  # a speech encoder: (waveform, lengths) -> pooled features
        exported.sample_rate = cfg.data.sample_rate  # what its input must be resampled to
        return exported.eval()
    return image_backbone(objective)


def image_backbone(objective: Any) -> nn.Module:
    """A vision objective's exported backbone copied into a fresh ``framework.models`` backbone
    (plain BatchNorm, no heads), eval mode, with the ``image_size`` it was pretrained at."""
    from framework.objectives.vision_common import build_backbone

    with torch.random.fork_rng(devices=[]):  # building draws initial weights: keep the caller's RNG stream
        backbone = build_backbone(objective.cfg)
    backbone.load_state_dict(objective.export_backbone().state_dict())
    backbone.image_size = objective.cfg.data.image_size  # the resolution it was pretrained at (features hold best there)
    return backbone.eval()


class ClipModel(nn.Module):
    """A CLIP run's towers for use: ``encode_image(images)`` and ``encode_text(list of str)`` give
    unit-length embeddings in one space (cosine similarity = dot product); ``logit_scale`` is
    the learned temperature multiplier."""

    def __init__(self, objective: nn.Module) -> None:
        super().__init__()
        from framework.data.pairs import CaptionEncoder

        self.objective = objective.eval()
        self.captions = CaptionEncoder(objective.cfg.data.tokenizer, objective.cfg.objective.context_length)
        self.image_size, self.channels = objective.cfg.data.image_size, objective.cfg.data.channels

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Float images (N, C, H, W) in [0, 1] at the trained size -> (N, D)."""
        return self.objective.encode_image(images)

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Strings -> (N, D), tokenized with the run's tokenizer and context length."""
        tokens, lengths = self.captions.batch(texts)
        return self.objective.encode_text(tokens, lengths)

    @property
    def logit_scale(self) -> float:
        return float(self.objective.scale().detach())


def load_clip(checkpoint_path: str | Path) -> ClipModel:
    """Both towers of a CLIP checkpoint (or run directory), with the run's tokenizer, in eval mode."""
    objective = load_objective(checkpoint_path)
    if objective.cfg.objective.name != "clip":
        raise ConfigError(f"{checkpoint_path} is a '{objective.cfg.objective.name}' run, not a clip one")
    from framework.text.tokenizer import load_tokenizer

    load_tokenizer(objective.cfg.data.tokenizer)  # a moved tokenizer fails here, naming its path
    return ClipModel(objective)


def load_text_tower(checkpoint_path: str | Path) -> Tuple[nn.Module, Any]:
    """The text tower of a CLIP checkpoint as ``(module, encoder)``: ``module(tokens, lengths)``
    gives unit-length embeddings; ``encoder(text)`` gives ``(tokens, length)`` for one string."""
    clip = load_clip(checkpoint_path)
    objective = clip.objective

    class TextEmbedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower, self.projection = objective.text_tower, objective.text_projection

        def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.normalize(self.projection(self.tower(tokens, lengths)), dim=-1)

    return TextEmbedder().eval(), clip.captions
