"""Helpers of the CLIP tests (a uniquely named module: every test folder has a conftest.py)."""
from __future__ import annotations

from run_helpers import metric_rows, png, run_cli  # noqa: F401 (re-exported to the CLIP tests)

# Tiny towers: a 2-process DDP run takes seconds on CPU.
VIT = ["model.name=vit", "model.patch_size=2", "model.dim=16", "model.depth=1", "model.heads=2"]
RESNET = ["model.name=resnet", "model.stem=cifar", "model.layers=[1,1]", "model.widths=[4,8]"]
TINY = ["objective.name=clip", "objective.embed_dim=8", "objective.context_length=12", "objective.text.dim=16",
        "objective.text.depth=1", "objective.text.heads=2", "data.image_size=8", "data.channels=1"]


def data_overrides(shards: dict) -> list[str]:
    """The pair shards' paths and the tiny towers (a ViT image tower)."""
    return [*TINY, *VIT, f"data.train={shards['train']}", f"data.val={shards['val']}", f"data.tokenizer={shards['tokenizer']}"]


def objective(*overrides: str, vocab: int = 64, model: list[str] = VIT):
    """A CLIP objective built from a config alone (no data read), the same weights every call."""
    import torch

    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    cfg = load_config(None, [*TINY, *model, "data.train=unused", f"objective.text.vocab_size={vocab}", *overrides])
    torch.manual_seed(0)
    return objective_module("clip").Objective(config_to_dict(cfg)).train()
