"""Pretext objectives, one file each. ``OBJECTIVES`` maps ``objective.name`` to its module.

Each module defines ``Config`` (a dataclass subclassing ``ObjectiveConfig``), the
LightningModule ``Objective`` and ``default_model`` (the ``model.name`` it uses by default).
"""
from __future__ import annotations

import importlib
from types import ModuleType

OBJECTIVES = {
    "clm": "framework.objectives.clm",
    "mlm": "framework.objectives.mlm",
    "simclr": "framework.objectives.simclr",
    "moco_v3": "framework.objectives.moco_v3",
    "byol": "framework.objectives.byol",
    "dino": "framework.objectives.dino",
    "mae": "framework.objectives.mae",
    "beit": "framework.objectives.beit",
    "clip": "framework.objectives.clip",
    "wav2vec2": "framework.objectives.wav2vec2",
    "hubert": "framework.objectives.hubert",
    "finetune": "framework.objectives.finetune",
}


def objective_module(name: str) -> ModuleType:
    return importlib.import_module(OBJECTIVES[name])
