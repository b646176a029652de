import torch

from framework.losses.language import IGNORE_INDEX
from framework.modules.masking import mask_tokens

MASK, EOS, VOCAB = 2, 0, 1000


def test_bert_masking_statistics():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, VOCAB, (64, 512), generator=generator)
    tokens[:, ::50] = EOS
    inputs, labels = mask_tokens(tokens, MASK, VOCAB, special_ids=[EOS], generator=generator)
    chosen = labels != IGNORE_INDEX
    maskable = tokens != EOS
    assert abs(chosen.sum() / maskable.sum() - 0.15) < 0.005
    assert not chosen[tokens == EOS].any()  # special tokens are never targets
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])  # unchosen tokens are untouched
    masked = (inputs == MASK) & chosen
    kept = (inputs == tokens) & chosen
    replaced = chosen & ~masked & ~kept
    n = chosen.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.01
    # a random replacement equals the original 1/VOCAB of the time: it counts as "kept"
    assert abs(kept.sum().item() / n - 0.1) < 0.01
    assert abs(replaced.sum().item() / n - 0.1) < 0.01
