import math

import numpy as np

from framework.evaluate.unigram import _blocks, unigram_perplexity
from framework.text.tokenizer import load_tokenizer


def test_unigram_perplexity_matches_a_direct_count(text_corpus):
    train, val, tokenizer = str(text_corpus["train"]), str(text_corpus["val"]), str(text_corpus["tokenizer"])
    vocab = load_tokenizer(tokenizer).get_vocab_size()
    counts = np.ones(vocab)
    for block in _blocks(train, tokenizer, 32):
        np.add.at(counts, block, 1)
    targets = np.concatenate([block[1:] for block in _blocks(val, tokenizer, 32)])
    expected = math.exp(-np.log(counts[targets] / counts.sum()).mean())
    got = unigram_perplexity(train, val, tokenizer, 32, vocab)
    assert abs(got - expected) / expected < 1e-9
    assert 1 < got < vocab
