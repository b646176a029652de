"""Raw text files -> webdataset text shards (one ``.txt`` member per sample).

Every input file is one document; long documents are cut at line boundaries into
consecutive chunks so that concatenating a document's chunks in key order gives back
the file exactly. With a ``metadata`` list file (.tsv/.jsonl: a path column and any others),
each sample also gets a ``json`` member with its file's columns and its source path; a
``label`` column becomes the class (``cls``): integers as they are, names numbered in sorted
order (the manifest's ``classes``). A file the list does not name is written without them. Writing runs in parallel and resumes after a crash through
:mod:`framework.data.writers.parallel`.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import random
from pathlib import Path
from typing import Any, NamedTuple

from framework.data.files import expand_inputs_with_names, read_text_file
from framework.data.writers.parallel import Sample, Skip, SplitResult, write_parallel
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


class TextItem(NamedTuple):
    """One input file; size and mtime are in it so that an edited file changes the fingerprint."""

    doc_index: int
    path: str
    split: str
    size: int
    mtime_ns: int
    name: str = ""  # relative to its input root
    extra: tuple = ()  # the metadata list file's columns for this file
    label: int | None = None


def _process_text(item: TextItem, max_chars: int) -> Skip | list[Sample]:
    """Read one document and cut it into samples (runs in a writer worker)."""
    text, reason = read_text_file(Path(item.path))
    if text is None:
        return Skip(item.path, reason or "unreadable")
    extra: dict[str, bytes] = {}
    if item.extra or item.label is not None:
        import json

        extra["json"] = json.dumps({"source": item.name, **dict(item.extra)}, ensure_ascii=False, sort_keys=True).encode()
    if item.label is not None:
        extra["cls"] = str(item.label).encode("ascii")
    return [
        Sample(sample_key(item.doc_index, chunk), {"txt": piece.encode("utf-8"), **extra}, split=item.split)
        for chunk, piece in enumerate(split_document(text, max_chars))
    ]


def _metadata_labels(entries: list[tuple]) -> tuple[dict[str, Any], list[str]]:
    """{label value as written: class index}, and the class names when the labels are names."""
    values = {str(dict(extra)["label"]) for extra in entries if "label" in dict(extra)}
    if all(v.lstrip("-").isdigit() for v in values):
        return {v: int(v) for v in values}, []
    classes = sorted(values)
    return {v: i for i, v in enumerate(classes)}, classes


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
    workers: int | None = None,
    shards_per_chunk: int = 8,
    metadata: str | None = None,
) -> dict[str, Any]:
    """Write text files (files, directories, globs) as shuffled webdataset shards under ``output``.

    With ``val_fraction > 0`` shards go to ``output/train`` and ``output/val``, else to
    ``output``; each directory gets a manifest. Empty and non-UTF-8 files are skipped with a
    warning and listed in the summary. ``doc_index`` in sample keys is the file's position in
    the sorted input list, so keys are stable and unique across splits.

    ``workers`` processes (default min(4, CPUs)) write chunks of about ``shards_per_chunk``
    shards each; the shards are the same for any ``workers``. Rerunning after a crash
    resumes; other inputs or options in a non-empty ``output`` need ``overwrite``.

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
    # stale_dirs: shards of the other layout from an earlier run would be just as misleading.

    found: dict[int, tuple] = {}
    if metadata:
        from framework.data.writers.list_file import metadata_columns

        found = metadata_columns(metadata, "text", files, ("source",))
    label_index, classes = _metadata_labels(list(found.values()))
    order = list(range(len(files)))
    random.Random(seed).shuffle(order)  # so shards are not sorted by directory
    items = []
    for doc_index in order:
        path = files[doc_index][0]
        try:
            stat = path.stat()
        except OSError as err:
            raise DataError(f"cannot read {path}: {err.strerror}") from err
        split = "val" if held_out[doc_index] else "train"
        columns = found.get(doc_index, ())
        label = dict(columns).get("label")
        items.append(TextItem(doc_index, str(path), split, stat.st_size, stat.st_mtime_ns, files[doc_index][1], columns,
                              label_index[str(label)] if label is not None else None))

    extra = {"source": "text", "max_chars_per_sample": max_chars_per_sample, "seed": seed, "val_fraction": val_fraction}
    if metadata:
        extra.update(classes=classes, metadata=str(metadata))

    def manifest_extra(name: str, result: SplitResult) -> dict[str, Any]:
        return {**extra, "split": name, "documents": result.items}

    def empty_error(skipped: list[tuple[str, str]]) -> DataError:
        first = f" (first: {skipped[0][0]}: {skipped[0][1]})" if skipped else ""
        return DataError(
            f"empty corpus: all {len(files)} input file(s) in {', '.join(map(str, inputs))} were skipped{first}"
        )

    result = write_parallel(
        items,
        functools.partial(_process_text, max_chars=max_chars_per_sample),
        out,
        writer="text",
        modality="text",
        options={"max_chars_per_sample": max_chars_per_sample, "seed": seed, "val_fraction": val_fraction,
                 **({"metadata": str(Path(metadata).resolve())} if metadata else {})},
        splits=split_dirs,
        stale_dirs=stale_dirs,
        max_samples_per_shard=max_samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        item_sizes=[item.size for item in items],
        shards_per_chunk=shards_per_chunk,
        workers=workers,
        overwrite=overwrite,
        manifest_extra=manifest_extra,
        empty_error=empty_error,
        description="writing text shards",
        prefix=SHARD_PREFIX,
    )
    skipped = [(name, reason) for name, reason in result.skipped]
    docs = {name: split.items for name, split in result.splits.items()}

    if val_fraction > 0 and docs["val"] == 0:
        log.warning("validation split %s is empty: every held-out file was skipped", split_dirs["val"])
    if skipped:
        log.warning("skipped %d of %d input file(s) (empty or not UTF-8)", len(skipped), len(files))
    splits = {
        name: {
            "dir": str(split.directory),
            "documents": split.items,
            "samples": split.samples,
            "shards": len(split.shards),
            "bytes": split.bytes,
        }
        for name, split in result.splits.items()
    }
    return {
        "files": len(files),
        "documents": sum(docs.values()),
        "samples": sum(s["samples"] for s in splits.values()),
        "skipped": skipped,
        "output": str(out),
        "splits": splits,
    }
