"""What both launchers share: validating a config the way ``pretrain fit`` would, before launching."""
from __future__ import annotations

from typing import List, Sequence

from framework.config.schema import RunConfig


def validated_config(config: str, overrides: Sequence[str]) -> RunConfig:
    """Load and check the config (schema, types, data paths, trainer options) with the launcher's
    overrides applied; raises ``ConfigError`` (one line at the CLI) so nothing is launched."""
    from framework.config.load import load_config
    from framework.training.fit import check_trainer

    cfg = load_config(config, list(overrides))
    check_trainer(cfg)
    return cfg


def layout_overrides(devices: int, nodes: int, accelerator: str | None = None) -> List[str]:
    extra = [f"trainer.devices={devices}", f"trainer.num_nodes={nodes}"]
    if accelerator is not None:
        extra.append(f"trainer.accelerator={accelerator}")
    return extra


def without_keys(overrides: Sequence[str], keys: Sequence[str]) -> List[str]:
    """The user's overrides minus those the launcher decides (it appends its own, which win anyway)."""
    return [o for o in overrides if o.split("=", 1)[0].strip() not in keys]
