import pytest
import torch

from framework.models.transformer import Transformer, TransformerConfig


def model(causal, position="rope", **kw):
    torch.manual_seed(0)
    return Transformer(TransformerConfig(dim=32, depth=2, heads=4, max_seq_len=32, position=position, **kw), 100, causal)


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_causal_model_ignores_the_future_and_encoder_sees_it(position):
    tokens = torch.randint(0, 100, (2, 12))
    changed = tokens.clone()
    changed[:, 8] = (changed[:, 8] + 1) % 100
    causal = model(True, position)
    assert torch.allclose(causal(tokens)[:, :8], causal(changed)[:, :8], atol=1e-6)
    assert not torch.allclose(causal(tokens)[:, 8:], causal(changed)[:, 8:])
    encoder = model(False, position)
    assert not torch.allclose(encoder(tokens)[:, :8], encoder(changed)[:, :8])


@pytest.mark.parametrize("position", ["rope", "learned"])
def test_positions_make_order_matter(position):
    # Without positions a bidirectional transformer is permutation-equivariant: swapping the
    # first two tokens would leave the output at position 3 unchanged.
    encoder = model(False, position)
    tokens = torch.tensor([[5, 9, 13, 21]])
    swapped = torch.tensor([[9, 5, 13, 21]])
    assert not torch.allclose(encoder(tokens)[0, 3], encoder(swapped)[0, 3], atol=1e-5)


def test_tied_embeddings_and_declared_blocks():
    m = model(True)
    assert m.head.weight is m.embed.weight
    assert all(isinstance(b, Transformer.repeated_blocks) for b in m.blocks)
    untied = model(True, tie_embeddings=False)
    assert untied.head.weight is not untied.embed.weight


def test_too_long_sequence_is_refused():
    with pytest.raises(ValueError, match="max_seq_len"):
        model(True)(torch.zeros(1, 40, dtype=torch.long))
