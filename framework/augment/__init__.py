"""Batched image augmentations that run on the training device (kornia)."""
from framework.augment.views import ViewAugment, ViewConfig, to_float_images

__all__ = ["ViewAugment", "ViewConfig", "to_float_images"]
