"""pretrain: distributed self-supervised pretraining. Public helpers are imported lazily."""
from __future__ import annotations

from typing import Any

__all__ = ["load_backbone"]


def __getattr__(name: str) -> Any:
    # Lazy: `import framework` stays cheap (the CLI imports it before parsing arguments).
    if name == "load_backbone":
        from framework.evaluate.backbone import load_backbone

        return load_backbone
    raise AttributeError(f"module 'framework' has no attribute {name!r}")
