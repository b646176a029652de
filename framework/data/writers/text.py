"""Raw text files -> webdataset text shards (one ``.txt`` member per sample).

Every input file is one document; long documents are cut at line boundaries into
consecutive chunks so that concatenating a document's chunks in key order gives back
the file exactly.
"""
from __future__ import annotations

import hashlib
import logging
import random
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from framework.data.files import expand_inputs_with_names, file_progress, read_text_file
from framework.data.writers.shard_writer import ShardWriter, clear_existing_outputs
from framework.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SHARD_PREFIX = "shard"


def split_document(text: str, max_chars: int) -> list[str]:
    """Cut ``text`` into chunks of at most ``max_chars`` characters, at ``\\n`` boundaries.

    A single line longer than ``max_chars`` is cut mid-line. ``"".join(chunks) == text``.
    """
    if len(text) <= max_chars:
        return [text]
    pieces = text.split("\n")
    lines = [p + "\n" for p in pieces[:-1]]
    if pieces[-1]:
        lines.append(pieces[-1])
    chunks: list[str] = []
    current: list[str] = []
    current_len = 0
    for line in lines:
        if current_len + len(line) > max_chars and current:
            chunks.append("".join(current))
            current, current_len = [], 0
        while len(line) > max_chars:
            chunks.append(line[:max_chars])
            line = line[max_chars:]
        if line:
            current.append(line)
            current_len += len(line)
    if current:
        chunks.append("".join(current))
    return chunks


def split_score(relative_name: str, seed: int) -> float:
    """A stable number in [0, 1) per document; it goes to val when below val_fraction.

    Hashing the path relative to its input root (not the absolute path, not the file
    order) keeps a document on the same side of the split when the corpus is moved or grows.
    """
    digest = hashlib.sha256(f"{seed}\0{relative_name}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def sample_key(doc_index: int, chunk: int) -> str:
    """Key of chunk ``chunk`` of document ``doc_index`` (its index in the sorted input files)."""
    return f"d{doc_index:08d}c{chunk:04d}"


def write_text_shards(
    inputs: list[str],
    output: str,
    include: list[str] | None = None,
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    max_chars_per_sample: int = 20000,
    val_fraction: float = 0.0,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Write text files (files, directories, globs) as shuffled webdataset shards under ``output``.

    With ``val_fraction > 0`` shards go to ``output/train`` and ``output/val``, else to
    ``output``; each directory gets a manifest. Empty and non-UTF-8 files are skipped with a
    warning and listed in the summary. ``doc_index`` in sample keys is the file's position in
    the sorted input list, so keys are stable and unique across splits.

    Returns ``{"files", "documents", "samples", "skipped": [(path, reason)], "output",
    "splits": {name: {"dir", "documents", "samples", "shards", "bytes"}}}``.
    """
    if max_samples_per_shard < 1:
        raise ConfigError(f"max_samples_per_shard must be >= 1, got {max_samples_per_shard}")
    if max_shard_bytes < 1:
        raise ConfigError(f"max_shard_bytes must be >= 1, got {max_shard_bytes}")
    if max_chars_per_sample < 1:
        raise ConfigError(f"max_chars_per_sample must be >= 1, got {max_chars_per_sample}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")

    files = expand_inputs_with_names(inputs, include)
    out = Path(output)
    if val_fraction > 0:
        if len(files) < 2:
            raise DataError(f"val_fraction={val_fraction} needs at least 2 input files, found {len(files)} in {inputs}")
        scores = [split_score(name, seed) for _, name in files]
        held_out = [score < val_fraction for score in scores]
        # Tiny corpora can hash entirely to one side; move the extreme document so both
        # splits exist (only in this degenerate case, so assignments stay stable otherwise).
        if not any(held_out) or all(held_out):
            flip = scores.index(min(scores)) if not any(held_out) else scores.index(max(scores))
            held_out[flip] = not held_out[flip]
        split_dirs = {"train": out / "train", "val": out / "val"}
        stale_dirs = [out]
    else:
        held_out = [False] * len(files)
        split_dirs = {"train": out}
        stale_dirs = [out / "train", out / "val"]
    # Shards of the other layout from an earlier run would be just as misleading.
    for directory in stale_dirs:
        clear_existing_outputs(directory, SHARD_PREFIX, overwrite)

    order = list(range(len(files)))
    random.Random(seed).shuffle(order)  # so shards are not sorted by directory

    extra = {"source": "text", "max_chars_per_sample": max_chars_per_sample, "seed": seed, "val_fraction": val_fraction}
    skipped: list[tuple[str, str]] = []
    docs = {name: 0 for name in split_dirs}
    with ExitStack() as stack:
        writers = {
            name: stack.enter_context(
                ShardWriter(
                    directory,
                    modality="text",
                    prefix=SHARD_PREFIX,
                    max_samples=max_samples_per_shard,
                    max_bytes=max_shard_bytes,
                    manifest_extra={**extra, "split": name},
                    overwrite=overwrite,
                )
            )
            for name, directory in split_dirs.items()
        }
        with file_progress("writing text shards", total=len(files)) as update:
            for doc_index in order:
                path, _ = files[doc_index]
                text, reason = read_text_file(path)
                if text is None:
                    log.warning("skipping %s: %s", path, reason)
                    skipped.append((str(path), reason))
                else:
                    split = "val" if held_out[doc_index] else "train"
                    for chunk, piece in enumerate(split_document(text, max_chars_per_sample)):
                        writers[split].write(sample_key(doc_index, chunk), {"txt": piece.encode("utf-8")})
                    docs[split] += 1
                update()
        if sum(docs.values()) == 0:
            # Raised inside the writers' context so they discard everything and write no manifest.
            raise DataError(
                f"empty corpus: all {len(files)} input file(s) in {', '.join(map(str, inputs))} were skipped "
                f"(first: {skipped[0][0]}: {skipped[0][1]})"
            )
        for name, writer in writers.items():
            writer.manifest_extra["documents"] = docs[name]
    # The writers are closed (shards renamed, manifests written) once the ExitStack exits.

    if val_fraction > 0 and docs["val"] == 0:
        log.warning("validation split %s is empty: every held-out file was skipped", split_dirs["val"])
    if skipped:
        log.warning("skipped %d of %d input file(s) (empty or not UTF-8)", len(skipped), len(files))
    splits = {
        name: {
            "dir": str(writer.directory),
            "documents": docs[name],
            "samples": sum(s["samples"] for s in writer.shards),
            "shards": len(writer.shards),
            "bytes": sum(s["bytes"] for s in writer.shards),
        }
        for name, writer in writers.items()
    }
    return {
        "files": len(files),
        "documents": sum(docs.values()),
        "samples": sum(s["samples"] for s in splits.values()),
        "skipped": skipped,
        "output": str(out),
        "splits": splits,
    }
