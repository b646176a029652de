"""Patches, MAE's random masking and reconstruction target, BEiT's blockwise masking and tokenizer."""
from __future__ import annotations

import pytest
import torch

from framework.losses.masked_image import masked_pixel_loss, masked_token_loss
from framework.modules.codebook import PatchCodebook
from framework.modules.patches import block_masking, normalize_patches, patchify, random_masking, unpatchify


def test_patchify_round_trip_and_layout():
    images = torch.rand(2, 3, 8, 12)
    patches = patchify(images, 4)
    assert patches.shape == (2, 6, 48)
    torch.testing.assert_close(unpatchify(patches, 4, 3, (2, 3)), images)
    # patch 1 is the second patch of the first row; its first value is pixel (0, 4), channel 0
    assert patches[0, 1, 0] == images[0, 0, 0, 4]


@pytest.mark.parametrize("ratio,length", [(0.75, 16), (0.75, 196), (0.5, 9), (0.4, 64)])
def test_random_masking_hides_exactly_the_ratio(ratio, length):
    keep, mask, restore = random_masking(32, length, ratio)
    hidden = round(length * ratio)
    assert mask.shape == (32, length) and (mask.sum(1) == hidden).all()
    assert keep.shape == (32, length - hidden)
    assert not mask.gather(1, keep).any(), "kept indices are the visible patches"
    # restore inverts the shuffle whose first part is ``keep`` and whose rest are the hidden patches
    shuffle = restore.argsort(1)
    assert torch.equal(shuffle[:, : length - hidden], keep)
    assert mask.gather(1, shuffle[:, length - hidden :]).all()


def test_masks_differ_between_samples():
    _, mask, _ = random_masking(8, 64, 0.75)
    assert len({tuple(m.tolist()) for m in mask}) == 8


def test_block_masking_count_and_blocks():
    torch.manual_seed(0)
    masks = block_masking(16, (14, 14), 0.4, min_patches=16)
    assert masks.shape == (16, 196) and (masks.sum(1) == round(196 * 0.4)).all()
    tiny = block_masking(4, (4, 4), 0.4, min_patches=2)
    assert (tiny.sum(1) == round(16 * 0.4)).all()


def test_mae_loss_uses_masked_patches_only_and_normalised_target():
    torch.manual_seed(0)
    images = torch.rand(2, 1, 8, 8)
    patches = patchify(images, 2)
    _, mask, _ = random_masking(2, patches.shape[1], 0.75)
    perfect = normalize_patches(patches)
    assert masked_pixel_loss(perfect, patches, mask) < 1e-10
    # Wrong predictions on visible patches do not count.
    noisy = perfect + torch.where(mask[..., None], 0.0, 5.0)
    assert masked_pixel_loss(noisy, patches, mask) < 1e-10
    # On hidden ones they do: unit error per pixel -> loss 1.
    assert masked_pixel_loss(perfect + mask[..., None].float(), patches, mask).item() == pytest.approx(1.0)
    # Without normalisation the target is the raw pixels.
    assert masked_pixel_loss(patches, patches, mask, normalize_target=False) < 1e-12
    target = normalize_patches(patches)
    assert torch.allclose(target.mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_mae_objective_reconstructs_every_patch(digit_shards):
    from vision_helpers import tiny_overrides
    from framework.config.load import config_to_dict, load_config
    from framework.objectives import objective_module

    cfg = load_config(None, tiny_overrides("mae", digit_shards))
    module = objective_module("mae").Objective(config_to_dict(cfg))
    prediction, mask = module.reconstruct(torch.rand(3, 1, 8, 8))
    assert prediction.shape == (3, 16, 4) and (mask.sum(1) == 12).all()


def test_beit_tokenizer_fits_and_encodes():
    torch.manual_seed(0)
    centres = torch.randn(4, 12)
    patches = torch.cat([c + 0.01 * torch.randn(50, 12) for c in centres])
    book = PatchCodebook(4, 12)
    assert not book.fitted
    book.fit(patches, iterations=10)
    assert book.fitted
    ids = book.encode(patches.view(4, 50, 12))
    assert ids.shape == (4, 50)
    assert all(len(set(row.tolist())) == 1 for row in ids), "each cluster is one token"
    assert len(set(ids[:, 0].tolist())) == 4


def test_masked_token_loss_only_on_masked():
    logits = torch.zeros(1, 3, 5)
    logits[0, 0, 1] = 100.0  # confident and right at position 0
    tokens = torch.tensor([[1, 2, 3]])
    assert masked_token_loss(logits, tokens, torch.tensor([[True, False, False]])) < 1e-6
    assert masked_token_loss(logits, tokens, torch.tensor([[False, True, False]])).item() == pytest.approx(torch.log(torch.tensor(5.0)).item())
