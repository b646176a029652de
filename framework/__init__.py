"""pretrain: distributed self-supervised pretraining. Public helpers are imported lazily."""
from __future__ import annotations

from typing import Any

__all__ = ["load_backbone", "load_clip", "load_text_tower"]


def __getattr__(name: str) -> Any:
    # Lazy: `import framework` stays cheap (the CLI imports it before parsing arguments).
    if name in __all__:
        from framework.evaluate import backbone

        return getattr(backbone, name)
    raise AttributeError(f"module 'framework' has no attribute {name!r}")
