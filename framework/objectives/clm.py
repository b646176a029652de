"""GPT-style causal language modelling: predict every next token."""
from __future__ import annotations

from dataclasses import dataclass

from framework.config.schema import ObjectiveConfig

default_model = "transformer"


@dataclass
class Config(ObjectiveConfig):
    name: str = "clm"
