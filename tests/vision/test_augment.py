"""Batched on-device augmentations: shapes, value ranges, 1 and 3 channels, multi-crop sizes."""
from __future__ import annotations

import pytest
import torch

from framework.augment import ViewAugment, ViewConfig, to_float_images
from framework.errors import ConfigError

STRONG = ViewConfig(blur=1.0, solarize=0.5, grayscale=0.5, jitter=1.0)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size,out", [(8, 0), (16, 8), (12, 20)])
def test_view_shapes_and_range(channels, size, out):
    torch.manual_seed(0)
    images = torch.rand(6, channels, size, size)
    view = ViewAugment(ViewConfig(size=out, blur=1.0, solarize=0.5), channels, size)(images)
    side = out or size
    assert view.shape == (6, channels, side, side)
    assert view.dtype == torch.float32 and view.min() >= 0.0 and view.max() <= 1.0


def test_views_differ_per_sample_and_per_call():
    torch.manual_seed(0)
    images = torch.rand(1, 3, 16, 16).expand(8, -1, -1, -1).contiguous()
    augment = ViewAugment(STRONG, 3, 16)
    a, b = augment(images), augment(images)
    assert not torch.allclose(a[0], a[1]), "each sample draws its own parameters"
    assert not torch.allclose(a, b)


def test_identity_view_keeps_the_image():
    images = torch.rand(4, 1, 8, 8)
    cfg = ViewConfig(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, jitter=0.0, grayscale=0.0)
    torch.testing.assert_close(ViewAugment(cfg, 1, 8)(images), images, atol=1e-5, rtol=0)


def test_uint8_batches_become_unit_floats():
    batch = torch.tensor([[[[0, 255], [128, 64]]]], dtype=torch.uint8)
    out = to_float_images(batch)
    assert out.dtype == torch.float32 and out.max() == 1.0 and out.min() == 0.0


def test_multicrop_global_and_local_sizes(digit_shards):
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    from vision_helpers import tiny_overrides

    cfg = load_config(None, [*tiny_overrides("dino", digit_shards), "objective.local_crops=3"])
    module = objective_module("dino").Objective(config_to_dict(cfg))
    views = module.views(torch.rand(5, 1, 8, 8))
    assert [tuple(v.shape) for v in views] == [(5, 1, 8, 8)] * 2 + [(5, 1, 4, 4)] * 3


def _principal_angle(image: torch.Tensor) -> float:
    """Degrees of the main axis of an image's mass, measured from the x axis."""
    ys, xs = torch.meshgrid(torch.arange(image.shape[0]).float(), torch.arange(image.shape[1]).float(), indexing="ij")
    w = image / image.sum()
    mx, my = (w * xs).sum(), (w * ys).sum()
    cxx, cyy, cxy = (w * (xs - mx) ** 2).sum(), (w * (ys - my) ** 2).sum(), (w * (xs - mx) * (ys - my)).sum()
    return float(torch.rad2deg(0.5 * torch.atan2(2 * cxy, cxx - cyy)))


def test_rotation_turns_each_sample_by_its_own_angle_within_the_limit():
    torch.manual_seed(0)
    bar = torch.zeros(1, 1, 33, 33)
    bar[..., 15:18, 4:29] = 1.0  # a horizontal bar through the centre
    cfg = ViewConfig(scale=[1.0, 1.0], ratio=[1.0, 1.0], hflip=0.0, jitter=0.0, grayscale=0.0, rotate=30.0)
    views = ViewAugment(cfg, 1, 33)(bar.expand(64, -1, -1, -1).contiguous())
    angles = [_principal_angle(v[0]) for v in views]
    assert max(abs(a) for a in angles) <= 31.0, "no rotation beyond the configured limit"
    assert max(angles) > 15.0 and min(angles) < -15.0, "both directions, per sample"
    assert views.min() >= 0.0 and views.max() <= 1.0


@pytest.mark.parametrize("bad,key", [(ViewConfig(hflip=1.5), "hflip"), (ViewConfig(scale=[0.5, 0.1]), "scale"),
                                     (ViewConfig(scale=[0.5, 1.5]), "scale"), (ViewConfig(rotate=-5.0), "rotate"),
                                     (ViewConfig(shear=90.0), "shear")])
def test_bad_view_options_name_the_key(bad, key):
    with pytest.raises(ConfigError, match=rf"objective\.view\.{key}"):
        ViewAugment(bad, 3, 16, "objective.view")


def test_channels_must_be_1_or_3():
    with pytest.raises(ConfigError, match="data.channels"):
        ViewAugment(ViewConfig(), 2, 16)
