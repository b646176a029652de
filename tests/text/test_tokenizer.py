"""Byte-level BPE tokenizer: training from files and shards, exact round trip, special ids, errors."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models

from framework.data.writers.text import write_text_shards
from framework.errors import ConfigError, DataError
from framework.text.tokenizer import SPECIAL_TOKENS, _collect_sources, load_tokenizer, special_token_ids, train_tokenizer

STDLIB = Path(sysconfig.get_paths()["stdlib"])
NON_ASCII = "naïve café — 東京\n\tüber 🙂 Ωmega"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "sub" / "tokenizer.json"
    path = train_tokenizer([str(STDLIB / "json"), str(STDLIB / "email")], str(out), vocab_size=400, include=["*.py"], max_bytes=300_000)
    assert path == out and out.is_file() and not out.with_name("tokenizer.json.tmp").exists()
    return out


def test_round_trip_ascii_code_and_non_ascii(trained: Path) -> None:
    tok = load_tokenizer(trained)
    code = (STDLIB / "textwrap.py").read_text(encoding="utf-8")[:5000]
    for text in (code, NON_ASCII, "  leading spaces\r\nand CRLF  ", ""):
        assert tok.decode(tok.encode(text).ids) == text
    # Learned merges make code shorter than one token per byte.
    assert len(tok.encode(code).ids) < len(code.encode("utf-8")) * 0.8


def test_special_ids_and_vocab_size(trained: Path) -> None:
    tok = load_tokenizer(trained)
    assert special_token_ids(tok) == {"eos": 0, "pad": 1, "mask": 2}
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    assert tok.get_vocab_size() == 400
    # Special tokens in text encode to their single id.
    assert tok.encode("a<|endoftext|>b").ids.count(0) == 1


def test_train_from_shards(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(40):
        (src / f"{i}.txt").write_text(f"supercalifragilistic number {i}\n" * 20, encoding="utf-8")
    write_text_shards([str(src)], str(tmp_path / "flat"), max_samples_per_shard=10)
    write_text_shards([str(src)], str(tmp_path / "split"), max_samples_per_shard=10, val_fraction=0.2)
    first_shard = sorted((tmp_path / "flat").glob("*.tar"))[0]
    for inputs in ([str(tmp_path / "flat")], [str(first_shard)], [str(tmp_path / "split")]):
        out = train_tokenizer(inputs, str(tmp_path / "tok.json"), vocab_size=300)
        tok = load_tokenizer(out)
        assert len(tok.encode("supercalifragilistic").ids) <= 2
        # Only the shards are read: manifests are metadata, not text.
        shards, raw_files = _collect_sources(inputs, None)
        assert raw_files == [] and shards and all(p.suffix == ".tar" for p in shards)


def test_max_bytes_limits_reading(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("alpha " * 2000)
    (tmp_path / "b.txt").write_text("zyxwvu " * 2000)
    tok = load_tokenizer(train_tokenizer([str(tmp_path)], str(tmp_path / "t.json"), vocab_size=300, include=["*.txt"], max_bytes=100))
    assert len(tok.encode("alpha").ids) == 1 and len(tok.encode("zyxwvu").ids) > 1


def test_empty_corpus_and_bad_arguments(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "empty.txt").write_bytes(b"")
    (src / "bad.txt").write_bytes(b"\xff\xff")
    with pytest.raises(DataError, match=r"empty corpus: .*src"):
        train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=300)
    assert not (tmp_path / "t.json").exists()
    with pytest.raises(DataError, match="nope"):
        train_tokenizer([str(tmp_path / "nope")], str(tmp_path / "t.json"))
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer([str(src)], str(tmp_path / "t.json"), vocab_size=100)


def test_load_errors_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(DataError) as err:
        load_tokenizer(missing)
    assert str(err.value) == f"tokenizer file not found: {missing} (train one with `pretrain tokenizer train`)"
    bad = tmp_path / "bad.json"
    bad.write_text("{ nope")
    with pytest.raises(DataError, match=str(bad)):
        load_tokenizer(bad)


def test_special_token_ids_missing_names_token() -> None:
    with pytest.raises(DataError, match=r"<\|endoftext\|>"):
        special_token_ids(Tokenizer(models.BPE()))
