import pytest
import torch

from framework.errors import ConfigError
from framework.models.vit import ViT, ViTConfig


def tiny(**overrides) -> ViT:
    torch.manual_seed(0)
    return ViT(ViTConfig(patch_size=2, dim=16, depth=1, heads=2, **overrides), channels=1).eval()


def test_grid_pool_keeps_where_things_are():
    mean, grid = tiny(pool="mean"), tiny(pool="grid", pool_grid=2)
    image = torch.zeros(1, 1, 8, 8)
    image[..., :4, :4] = 1.0  # the same content in the top-left ...
    mirrored = image.flip(-1)  # ... and in the top-right quadrant
    assert grid(image).shape == (1, 4 * 16) and grid.feature_dim == 64
    assert not torch.allclose(grid(image), grid(mirrored), atol=1e-4)
    # the grid's regions are the mean pool's parts: averaging them gives the mean pool back
    regions = grid(image).view(1, 16, 4).mean(-1)
    torch.testing.assert_close(regions, mean(image))


def test_grid_pool_size_does_not_depend_on_the_crop():
    model = tiny(pool="grid", pool_grid=2)
    assert model(torch.rand(3, 1, 8, 8)).shape == model(torch.rand(3, 1, 4, 4)).shape == (3, 64)


def test_bad_pool_is_a_config_error():
    with pytest.raises(ConfigError, match="model.pool must be"):
        tiny(pool="max")
    with pytest.raises(ConfigError, match="model.pool_grid"):
        tiny(pool="grid", pool_grid=0)
