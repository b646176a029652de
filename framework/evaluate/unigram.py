"""A unigram language model: the baseline a language model must beat on held-out text."""
from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from framework.data.sources import resolve_shards, with_counts
from framework.data.stream import ShardStream
from framework.data.text import TokenPacker


def _blocks(spec: Any, tokenizer: str, block_len: int) -> Iterable[np.ndarray]:
    # The same reader and packer as training, in one process, one pass, no shuffling.
    return ShardStream(with_counts(resolve_shards(spec)), TokenPacker(tokenizer, block_len), seed=0, endless=False)


def unigram_perplexity(train: Any, val: Any, tokenizer: str, block_len: int, vocab_size: int) -> float:
    """Fit add-one-smoothed token frequencies on ``train``; return the perplexity on the
    tokens a causal LM predicts in ``val`` (every token of a packed block but the first)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for block in _blocks(train, tokenizer, block_len):
        counts += np.bincount(block, minlength=vocab_size)
    log_prob = np.log(counts / counts.sum())
    total, n = 0.0, 0
    for block in _blocks(val, tokenizer, block_len):
        total -= log_prob[block[1:]].sum()
        n += len(block) - 1
    return float(np.exp(total / n))
