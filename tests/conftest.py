"""Shared fixtures: a small real text corpus (files of the Python standard library),
its shards and a tokenizer, built once per test session."""
from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def text_corpus(tmp_path_factory) -> dict:
    """Shards (train/val) and a 512-token BPE tokenizer from json/, email/ and a few modules."""
    from framework.data.writers.text import write_text_shards
    from framework.text.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    inputs = [str(STDLIB / "json"), str(STDLIB / "email"), str(STDLIB / "argparse.py"), str(STDLIB / "textwrap.py")]
    write_text_shards(inputs, str(root / "shards"), include=["*.py"], max_samples_per_shard=8, val_fraction=0.15, seed=1)
    tokenizer = train_tokenizer([str(root / "shards" / "train")], str(root / "tokenizer.json"), vocab_size=512)
    return {"root": root, "train": root / "shards" / "train", "val": root / "shards" / "val", "tokenizer": tokenizer}
