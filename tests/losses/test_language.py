import math

import torch

from framework.losses.language import IGNORE_INDEX, masked_token_loss, next_token_loss


def test_next_token_loss_matches_a_reference_loop():
    torch.manual_seed(0)
    logits, tokens = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    total, n = 0.0, 0
    for b in range(2):
        for t in range(4):  # position t predicts token t+1
            probs = torch.softmax(logits[b, t], dim=-1)
            total -= math.log(probs[tokens[b, t + 1]].item())
            n += 1
    assert abs(next_token_loss(logits, tokens).item() - total / n) < 1e-5


def test_masked_loss_counts_only_labelled_positions():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 7)
    labels = torch.tensor([[IGNORE_INDEX, 3, IGNORE_INDEX, 5]])
    expected = -(torch.log_softmax(logits[0, 1], -1)[3] + torch.log_softmax(logits[0, 3], -1)[5]) / 2
    assert torch.allclose(masked_token_loss(logits, labels), expected)
