"""Fixtures of the CLIP tests: one intra-op thread, and scikit-learn's digits as small image-caption
pair shards with a BPE tokenizer trained on their captions."""
from __future__ import annotations

import json

import numpy as np
import pytest

from run_helpers import one_thread

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def pair_shards(tmp_path_factory) -> dict:
    """128 train + 48 val digit pairs ("a handwritten seven", "the digit 7", ...) in shards of 32,
    labels in each pair's json; a 300-token tokenizer on the training captions."""
    from sklearn.datasets import load_digits

    from clip_helpers import png
    from framework.data.writers.pairs import write_pair_shards
    from framework.text.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("pairs")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    templates = ["a handwritten {}", "the digit {}", "{} written by hand"]
    out = {"root": root}
    for split, indices in (("train", range(0, 128)), ("val", range(128, 176))):
        folder = root / "png" / split
        folder.mkdir(parents=True)
        rows = []
        for i in indices:
            (folder / f"{i:04d}.png").write_bytes(png(images[i]))
            label = int(digits.target[i])
            name = WORDS[label] if i % 2 else str(label)
            rows.append({"image": f"{i:04d}.png", "caption": templates[i % 3].format(name), "label": label})
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_pair_shards([str(folder / "pairs.jsonl")], str(root / split), max_samples_per_shard=32, seed=0)
        out[split] = root / split
        (root / f"{split}.txt").write_text("\n".join(r["caption"] for r in rows))
    out["tokenizer"] = train_tokenizer([str(root / "train.txt")], str(root / "tokenizer.json"), vocab_size=300)
    return out
