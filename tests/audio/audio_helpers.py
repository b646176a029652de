"""Helpers of the speech tests (a uniquely named module: every test folder has a conftest.py)."""
from __future__ import annotations

from run_helpers import metric_rows, run_cli  # noqa: F401 (re-exported to the speech tests)

# A tiny encoder: three convs (stride 80: 5 ms frames at 16 kHz), one transformer block, no dropout
# (the exactness tests compare losses of different batch layouts).
TINY_MODEL = ["model.name=audio_encoder", "model.conv_layers=[[16,10,5],[16,4,4],[16,4,4]]", "model.dim=16",
              "model.depth=1", "model.heads=2", "model.pos_conv_kernel=8", "model.pos_conv_groups=2", "model.dropout=0.0"]
WAV2VEC2 = ["objective.name=wav2vec2", "objective.codebooks=2", "objective.codebook_entries=8", "objective.final_dim=8",
            "objective.distractors=5", "objective.mask_length=4", "objective.mask_prob=0.5"]
HUBERT = ["objective.name=hubert", "objective.final_dim=8", "objective.mask_length=4", "objective.mask_prob=0.5",
          "objective.unmasked_weight=0.5"]
DATA = ["data.batch_size=4", "data.val_batch_size=8", "data.max_seconds=1.0", "data.shuffle_buffer=12",
        "data.num_workers=1", "data.sample_rate=16000"]
QUIET = ["logging.wandb=disabled", "logging.progress=false"]


def fit_args(shards: dict, run_dir, *extra: str, objective: list[str] = WAV2VEC2) -> list[str]:
    return ["fit", *objective, *TINY_MODEL, *DATA, *QUIET, f"data.train={shards['train']}", f"data.val={shards['val']}",
            "trainer.max_steps=6", "trainer.val_every_steps=6", "trainer.checkpoint_every_steps=3",
            "trainer.log_every_steps=1", "trainer.devices=2", "optim.warmup_steps=2", f"run.dir={run_dir}", *extra]


def objective(*overrides: str, name: str = "wav2vec2"):
    """An objective built from a config alone (no data read), the same weights every call."""
    import torch

    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    spec = WAV2VEC2 if name == "wav2vec2" else [*HUBERT, "objective.clusters=6"]
    cfg = load_config(None, [*spec, *TINY_MODEL, *DATA, "data.train=unused", "trainer.max_steps=10", *overrides])
    torch.manual_seed(0)
    return objective_module(name).Objective(config_to_dict(cfg)).train()
