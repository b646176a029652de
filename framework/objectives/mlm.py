"""BERT-style masked language modelling."""
from __future__ import annotations

from dataclasses import dataclass

from framework.config.schema import ObjectiveConfig

default_model = "transformer"


@dataclass
class Config(ObjectiveConfig):
    name: str = "mlm"
    mask_prob: float = 0.15  # fraction of tokens chosen for prediction
    replace_with_mask: float = 0.8  # of those: replaced by <|mask|>
    replace_with_random: float = 0.1  # ... by a random token; the rest are kept
