"""Byte-level BPE tokenizer: train from raw text or text shards, load, look up special ids.

Byte-level means every byte sequence is encodable (no unknown token) and decoding gives
back the exact input text, including non-ASCII.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Iterator

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from framework.data.compressed import SHARD_SUFFIXES
from framework.data.formats import ROW_SUFFIXES
from framework.data.faults import ON_ERROR, report_fault
from framework.data.files import expand_inputs, file_progress, read_text_file
from framework.data.manifest import MANIFEST_NAME
from framework.data.sources import iter_shard, resolve_shards
from framework.data.tar import TarFormatError
from framework.errors import ConfigError, DataError, SampleError

log = logging.getLogger(__name__)

# Listed first to the trainer, so their ids are 0, 1, 2 in every tokenizer we train.
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|mask|>"]
_SPECIAL_KEYS = {"eos": "<|endoftext|>", "pad": "<|pad|>", "mask": "<|mask|>"}
_BYTE_ALPHABET = 256


def _is_shard(path: Path) -> bool:
    """A tar shard, or a row file (Parquet, JSON Lines: its ``text`` column is read)."""
    return path.name.lower().endswith((*SHARD_SUFFIXES, *ROW_SUFFIXES))


def _shard_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_file() and _is_shard(p)) if directory.is_dir() else []


def _collect_sources(inputs: list[str], include: list[str] | None) -> tuple[list[Path], list[Path]]:
    """Split inputs into (tar shards, raw text files).

    A directory directly holding shards (.tar, .tar.gz, .tgz) is a shard directory (its shards
    are read, ``include`` does not apply); any other input goes through expand_inputs, where
    files with a shard's suffix are read as shards too and a manifest next to shards is skipped.
    """
    shards: list[Path] = []
    other: list[str] = []
    for raw in inputs:
        path = Path(os.path.expanduser(raw))
        if _shard_files(path):
            shards.extend(Path(os.path.abspath(p)) for p in _shard_files(path))
        else:
            other.append(raw)
    raw_files: list[Path] = []
    if other or not shards:
        for path in expand_inputs(other, include):
            if _is_shard(path):
                shards.append(path)
            elif path.name == MANIFEST_NAME and _shard_files(path.parent):
                continue  # shard metadata, not text
            else:
                raw_files.append(path)
    # The same shard could be named twice (as a directory and via a glob).
    return sorted(set(shards)), raw_files


def _shard_texts(path: Path, on_error: str) -> Iterator[tuple[str, int]]:
    """Yield (text, byte count) of every ``.txt`` member of a shard, with the tar reader and
    fault policy that training uses: a damaged shard or a member that is not UTF-8 stops the
    command under ``raise``, and is named and skipped under ``skip``."""
    found = 0
    try:
        for shard in resolve_shards(str(path), "--input"):  # a tar shard, or a row file's units
            if shard.fault is not None:
                report_fault(f"shard {path}", shard.fault, on_error)
            for key, sample in iter_shard(shard, bad_rows=True):  # named under on_error below
                try:
                    data = sample.get("txt")
                except SampleError as err:  # a bad row of a row file
                    report_fault(f"shard {path}, sample {key}", str(err), on_error)
                    continue
                if data is None:
                    continue
                if isinstance(data, str):
                    text = data
                else:
                    try:
                        text = str(data, "utf-8")
                    except UnicodeDecodeError as err:
                        report_fault(f"shard {path}, sample {key}", f"its .txt is not valid UTF-8 (byte {err.start})", on_error)
                        continue
                found += 1
                yield text, len(data)
    except (TarFormatError, OSError) as err:
        report_fault(f"shard {path}", str(err), on_error)
    if not found:
        log.warning("shard %s has no readable .txt members; nothing read from it", path)


class _CorpusStats:
    def __init__(self) -> None:
        self.texts = 0
        self.bytes = 0
        self.skipped = 0


def _corpus(
    shards: list[Path], raw_files: list[Path], max_bytes: int | None, stats: _CorpusStats, update: Callable[..., None],
    on_error: str,
) -> Iterator[str]:
    """Yield documents until ``max_bytes`` have been read, updating stats and the progress bar."""

    def texts(source: Path) -> Iterator[tuple[str, int]]:
        if source in shard_set:
            yield from _shard_texts(source, on_error)
            return
        text, reason = read_text_file(source)
        if text is None:
            log.warning("skipping %s: %s", source, reason)
            stats.skipped += 1
            return
        yield text, len(text.encode("utf-8"))

    shard_set = set(shards)
    for source in [*shards, *raw_files]:
        for text, size in texts(source):
            stats.texts += 1
            stats.bytes += size
            yield text
            if max_bytes is not None and stats.bytes >= max_bytes:
                update(0, description="computing BPE merges")
                return
        update()
    update(0, description="computing BPE merges")


def train_tokenizer(
    inputs: list[str],
    output: str,
    vocab_size: int = 8192,
    min_frequency: int = 2,
    include: list[str] | None = None,
    max_bytes: int | None = None,
    on_error: str = "skip",
) -> Path:
    """Train a byte-level BPE tokenizer and save it as JSON at ``output``; returns the path.

    ``inputs`` are raw text files/directories/globs and/or webdataset .tar shards or
    directories of shards (their ``*.txt`` members are read). Special tokens get ids 0, 1, 2.
    ``max_bytes`` stops reading after that much text (sources are read in sorted order).
    If ``output`` is an existing directory the file is ``output/tokenizer.json``. Damaged
    shards follow ``on_error`` as ``data.on_error`` does in training.
    """
    if vocab_size < _BYTE_ALPHABET + len(SPECIAL_TOKENS):
        raise ConfigError(f"vocab_size must be >= {_BYTE_ALPHABET + len(SPECIAL_TOKENS)} (256 bytes + special tokens), got {vocab_size}")
    if min_frequency < 1:
        raise ConfigError(f"min_frequency must be >= 1, got {min_frequency}")
    if max_bytes is not None and max_bytes < 1:
        raise ConfigError(f"max_bytes must be >= 1, got {max_bytes}")
    if on_error not in ON_ERROR:
        raise ConfigError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
    target = Path(output)
    if target.is_dir():
        target = target / "tokenizer.json"

    shards, raw_files = _collect_sources(inputs, include)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # our rich bar covers reading; two bars would garble the terminal
    )
    stats = _CorpusStats()
    with file_progress("reading text for tokenizer", total=len(shards) + len(raw_files)) as update:
        tokenizer.train_from_iterator(_corpus(shards, raw_files, max_bytes, stats, update, on_error), trainer=trainer)
    if stats.texts == 0:
        raise DataError(f"empty corpus: no text found in {', '.join(map(str, inputs))} ({stats.skipped} file(s) skipped)")
    if stats.skipped:
        log.warning("skipped %d input file(s) (empty or not UTF-8)", stats.skipped)
    log.info("trained tokenizer on %d documents (%d bytes), vocab %d", stats.texts, stats.bytes, tokenizer.get_vocab_size())

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tokenizer.save(str(tmp))
    os.replace(tmp, target)  # never a half-written tokenizer under the final name
    return target


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer JSON; DataError naming the path when missing or invalid."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"tokenizer file not found: {path} (train one with `pretrain tokenizer train`)")
    if not path.is_file():
        raise DataError(f"tokenizer path is not a file: {path}")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for bad JSON or schema
        raise DataError(f"cannot load tokenizer {path}: {err}") from err


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids of the special tokens as ``{"eos", "pad", "mask"}``; DataError naming a missing one."""
    ids: dict[str, int] = {}
    for key, token in _SPECIAL_KEYS.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise DataError(f"tokenizer lacks special token {token} ({key}); train one with `pretrain tokenizer train`")
        ids[key] = token_id
    return ids
