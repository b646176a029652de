"""Image-text pairs listed in .jsonl/.csv/.tsv files -> webdataset shards.

One sample per row: the image file's bytes as they are (no re-encode) under the image's
own extension (``jpg``, ``png``, ``webp``, ...; the content decides when the file name
lies), the caption as ``txt`` and the row's other fields, if any, as ``json``. A row whose
image is missing, unreadable or not an image, whose caption is empty, or which cannot be
parsed is skipped with a warning naming ``LIST:LINE`` and counted in the summary.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import random
from pathlib import Path
from typing import Any, Iterator, NamedTuple

from framework.data.writers.parallel import Sample, Skip, SplitResult, write_parallel
from framework.errors import ConfigError, DataError

log = logging.getLogger(__name__)

# Magic bytes -> (canonical extension, other extensions meaning the same format).
_IMAGE_FORMATS: list[tuple[bytes, int, str, tuple[str, ...]]] = [
    (b"\xff\xd8\xff", 0, "jpg", ("jpeg",)),
    (b"\x89PNG\r\n\x1a\n", 0, "png", ()),
    (b"WEBP", 8, "webp", ()),  # RIFF....WEBP
    (b"GIF8", 0, "gif", ()),
    (b"BM", 0, "bmp", ()),
    (b"II*\x00", 0, "tiff", ("tif",)),
    (b"MM\x00*", 0, "tiff", ("tif",)),
]
LIST_FORMATS = (".jsonl", ".ndjson", ".csv", ".tsv")


def image_extension(data: bytes, filename: str) -> str | None:
    """The member extension for image ``data``: the file's own if it matches the content, else
    the content's canonical one; None when ``data`` is no known image format."""
    own = Path(filename).suffix.lower().lstrip(".")
    for magic, offset, canonical, aliases in _IMAGE_FORMATS:
        if data[offset:offset + len(magic)] == magic and (offset == 0 or data[:4] == b"RIFF"):
            return own if own in (canonical, *aliases) else canonical
    return None


class PairItem(NamedTuple):
    """One usable row; ``size`` makes a replaced image change the write's fingerprint."""

    key: str
    name: str  # LIST:LINE, for messages
    image: str  # absolute path
    caption: str
    extra: str  # JSON of the row's other fields, "" when none
    size: int


def _process_pair(item: PairItem, verify: bool) -> Skip | list[Sample]:
    """Read and check one row's image (runs in a writer worker)."""
    try:
        data = Path(item.image).read_bytes()
    except FileNotFoundError:
        return Skip(item.name, f"image file not found: {item.image}")
    except OSError as err:
        return Skip(item.name, f"cannot read image {item.image}: {err.strerror or err}")
    if not data:
        return Skip(item.name, f"empty image file: {item.image}")
    ext = image_extension(data, item.image)
    if ext is None:
        return Skip(item.name, f"not an image (unknown format): {item.image}")
    if verify:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as image:
                image.load()  # decodes all pixels: catches truncated files, which verify() misses
        except Exception as err:  # Pillow raises many types for bad files
            return Skip(item.name, f"cannot decode image {item.image}: {err}")
    members = {ext: data, "txt": item.caption.encode("utf-8")}
    if item.extra:
        members["json"] = item.extra.encode("utf-8")
    return [Sample(item.key, members)]


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    """(line number, row or None, why not) for each non-blank line."""
    try:
        handle = open(path, "rb")
    except OSError as err:
        raise DataError(f"cannot read list file {path}: {err.strerror}") from err
    with handle:
        for line_no, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                yield line_no, None, "not valid UTF-8"
                continue
            except json.JSONDecodeError as err:
                yield line_no, None, f"invalid JSON ({err.msg} at column {err.colno})"
                continue
            if not isinstance(row, dict):
                yield line_no, None, f"expected a JSON object, got {type(row).__name__}"
                continue
            yield line_no, row, ""


def _csv_rows(path: Path, delimiter: str, needed: list[str]) -> Iterator[tuple[int, dict[str, Any] | None, str]]:
    try:
        handle = open(path, encoding="utf-8-sig", newline="")
    except OSError as err:
        raise DataError(f"cannot read list file {path}: {err.strerror}") from err
    with handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                raise DataError(f"list file {path} is empty: expected a header row naming {needed}")
            missing = [k for k in needed if k not in header]
            if missing:
                raise DataError(
                    f"list file {path} has no column {', '.join(map(repr, missing))} (columns: {', '.join(header)}); "
                    f"choose them with --image-key/--caption-key"
                )
            for row in reader:
                if None in row:  # more fields than the header
                    yield reader.line_num, None, f"{len(header) + len(row[None])} fields, the header has {len(header)}"
                elif any(v is None for v in row.values()):
                    yield reader.line_num, None, f"fewer fields than the {len(header)} of the header"
                else:
                    yield reader.line_num, row, ""
        except UnicodeDecodeError as err:
            raise DataError(f"list file {path} is not valid UTF-8 (after line {reader.line_num}): {err.reason}") from err
        except csv.Error as err:
            raise DataError(f"list file {path} line {reader.line_num}: {err}") from err


def read_pairs(
    lists: list[str], image_key: str, caption_key: str
) -> tuple[list[PairItem], list[tuple[str, str]], int]:
    """Parse the list files: (usable rows, skipped rows as (LIST:LINE, reason), rows seen)."""
    items: list[PairItem] = []
    skipped: list[tuple[str, str]] = []
    rows = 0
    for file_index, raw in enumerate(lists):
        path = Path(os.path.expanduser(raw))
        if not path.is_file():
            raise DataError(f"list file not found: {raw}" if not path.exists() else f"list file is not a file: {raw}")
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".ndjson"):
            parsed = _jsonl_rows(path)
        elif suffix in (".csv", ".tsv"):
            parsed = _csv_rows(path, "\t" if suffix == ".tsv" else ",", [image_key, caption_key])
        else:
            raise DataError(f"list file {raw}: unsupported format {suffix or '(no extension)'}; use one of {', '.join(LIST_FORMATS)}")
        base = path.resolve().parent
        for line_no, row, why in parsed:
            rows += 1
            name = f"{path}:{line_no}"
            if row is None:
                skipped.append((name, why))
                continue
            image, caption = row.get(image_key), row.get(caption_key)
            if image_key not in row:
                skipped.append((name, f"no {image_key!r} field (fields: {', '.join(map(str, row))})"))
            elif not isinstance(image, str) or not image.strip():
                skipped.append((name, f"{image_key!r} is empty or not a string: {image!r}"))
            elif caption_key not in row:
                skipped.append((name, f"no {caption_key!r} field (fields: {', '.join(map(str, row))})"))
            elif not isinstance(caption, str):
                skipped.append((name, f"caption {caption_key!r} is not a string: {caption!r}"))
            elif not caption.strip():
                skipped.append((name, "empty caption"))
            else:
                image_path = os.path.abspath(base / os.path.expanduser(image.strip()))
                others = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
                extra = json.dumps(others, ensure_ascii=False, sort_keys=True) if others else ""
                try:
                    size = os.stat(image_path).st_size
                except OSError:
                    size = 0  # reported by the worker, which names the row
                items.append(PairItem(f"p{file_index:04d}r{line_no:09d}", name, image_path, caption, extra, size))
    return items, skipped, rows


def write_pair_shards(
    inputs: list[str],
    output: str,
    image_key: str = "image",
    caption_key: str = "caption",
    max_samples_per_shard: int = 1000,
    max_shard_bytes: int = 64 * 2**20,
    seed: int = 0,
    verify: bool = False,
    overwrite: bool = False,
    workers: int | None = None,
    shards_per_chunk: int = 8,
) -> dict[str, Any]:
    """Write the image-caption rows of the list files ``inputs`` as shards under ``output``.

    Image paths are relative to their list file's directory (or absolute). Rows are written
    in an order shuffled by ``seed``; the key ``p{list:04d}r{line:09d}`` names the row.
    ``verify`` decodes every image with Pillow. Parallel and resumable as
    :func:`framework.data.writers.parallel.write_parallel`.

    Returns ``{"inputs" (rows seen), "samples", "skipped": [(LIST:LINE, reason)], "output",
    "shards", "bytes", "resumed_chunks"}``; DataError when no row is usable.
    """
    if not image_key or not caption_key or image_key == caption_key:
        raise ConfigError(f"image and caption keys must be two different names, got {image_key!r} and {caption_key!r}")
    if not inputs:
        raise DataError("no list files given")
    items, parse_skipped, rows = read_pairs(inputs, image_key, caption_key)
    for name, reason in parse_skipped:
        log.warning("skipping %s: %s", name, reason)
    where = ", ".join(map(str, inputs))

    def empty_error(worker_skipped: list[tuple[str, str]]) -> DataError:
        skipped = parse_skipped + worker_skipped
        if not skipped:
            return DataError(f"no rows in {where}")
        return DataError(
            f"no usable image-text pairs: all {rows} row(s) in {where} were skipped "
            f"(first: {skipped[0][0]}: {skipped[0][1]})"
        )

    if not items:
        raise empty_error([])
    random.Random(seed).shuffle(items)  # list files are often sorted by source or topic

    def manifest_extra(name: str, result: SplitResult) -> dict[str, Any]:
        return {"source": "pairs", "lists": [str(Path(p).resolve()) for p in inputs], "image_key": image_key,
                "caption_key": caption_key, "seed": seed, "rows": rows, "skipped": rows - result.items}

    result = write_parallel(
        items,
        functools.partial(_process_pair, verify=verify),
        output,
        writer="pairs",
        modality="image-text",
        options={"image_key": image_key, "caption_key": caption_key, "seed": seed, "verify": verify},
        max_samples_per_shard=max_samples_per_shard,
        max_shard_bytes=max_shard_bytes,
        item_sizes=[item.size for item in items],
        shards_per_chunk=shards_per_chunk,
        workers=workers,
        overwrite=overwrite,
        manifest_extra=manifest_extra,
        empty_error=empty_error,
        description="writing image-text shards",
    )
    skipped = parse_skipped + result.skipped
    if skipped:
        log.warning("skipped %d of %d row(s) in %s", len(skipped), rows, where)
    split = result.splits["train"]
    return {
        "inputs": rows,
        "samples": split.samples,
        "skipped": skipped,
        "output": str(split.directory),
        "shards": len(split.shards),
        "bytes": split.bytes,
        "resumed_chunks": result.resumed_chunks,
    }
