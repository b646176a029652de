"""Helpers of the vision tests (a uniquely named module: every test folder has a conftest.py)."""
from __future__ import annotations

from run_helpers import REPO, metric_rows, png, run_cli  # noqa: F401 (re-exported to the vision tests)

# Tiny sizes for every method, so a 2-process DDP run takes seconds on CPU.
TINY = {
    "simclr": ["objective.proj_hidden_dim=32", "objective.proj_dim=16"],
    "moco_v3": ["objective.mlp_hidden_dim=32", "objective.dim=16"],
    "byol": ["objective.mlp_hidden_dim=32", "objective.proj_dim=16"],
    "dino": ["objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16", "objective.local_crops=2",
             "objective.local.size=4"],
    "mae": ["objective.decoder_dim=16", "objective.decoder_depth=1", "objective.decoder_heads=2"],
    "beit": ["objective.codebook_size=8", "objective.min_mask_patches=2"],
}
TINY_MODEL = {
    "resnet": ["model.name=resnet", "model.stem=cifar", "model.layers=[1,1]", "model.widths=[8,16]"],
    "vit": ["model.name=vit", "model.patch_size=2", "model.dim=16", "model.depth=1", "model.heads=2"],
}
BACKBONE = {"simclr": "resnet", "moco_v3": "vit", "byol": "resnet", "dino": "vit", "mae": "vit", "beit": "vit"}


def tiny_overrides(method: str, shards: dict) -> list[str]:
    return [
        f"objective.name={method}", *TINY_MODEL[BACKBONE[method]], *TINY[method],
        f"data.train={shards['train']}", f"data.val={shards['val']}", "data.image_size=8", "data.channels=1",
    ]
