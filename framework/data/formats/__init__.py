"""Corpora in the formats they ship in: Parquet and JSON Lines (plain, gzip, zstd) read as shards.

A row file is cut into *units* (framework/data/sources.py makes each one a ``Shard`` with its
``rows``): a Parquet row group, or a range of ``data.max_rows_per_read`` rows of a larger one;
a JSON Lines stretch between two seek points of its index (``pretrain data index``). The epoch
plan shuffles units like tar shards, and a unit's position is its row number: a resumed
stream reads from that row of that unit, never from the file's start.

A row becomes a sample with the members the decoders know (``row_sample``): the text column
(``data.text_key``) as ``txt``, the image or audio column (``data.image_key``/``audio_key``: raw
bytes or Hugging Face's ``{bytes, path}`` struct) under its file extension, the caption
(``data.caption_key``) as ``txt``, a ``label`` as ``cls``, and every other column in ``json``
(the sample's metadata: subgroup keys, filters). The sample key is the ``data.id_key`` column,
else ``<file stem>:<row>``. A bad row (not JSON, not UTF-8, a null or empty text) is a bad
*sample*, named by file and row, under ``data.on_error``.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any, Dict, Iterator, List, Optional, Tuple

import orjson

from framework.data.tar import TarFormatError
from framework.errors import SampleError

PARQUET_SUFFIXES = (".parquet",)
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".json.zst", ".ndjson")
ROW_SUFFIXES = PARQUET_SUFFIXES + JSONL_SUFFIXES
TEXT, IMAGE, AUDIO = "txt", "<image>", "<audio>"  # member roles: a column's bytes get their extension
_IMAGE_MAGIC = ((b"\x89PNG", "png"), (b"\xff\xd8\xff", "jpg"), (b"RIFF", "webp"), (b"BM", "bmp"), (b"GIF8", "gif"))
_AUDIO_MAGIC = ((b"fLaC", "flac"), (b"RIFF", "wav"), (b"OggS", "ogg"), (b"ID3", "mp3"))


class RowFormatError(TarFormatError):
    """A row file that cannot be read (a corrupt footer, a truncated compressed stream): a
    fault of the shard, caught wherever tar damage is."""


@dataclass(frozen=True)
class RowFields:
    """Which columns a modality reads, and as which members (``row_fields`` builds it from
    ``data``): ``members`` is ((column, member role), ...); ``extra`` the other columns kept
    as metadata (None: all of them)."""

    members: Tuple[Tuple[str, str], ...] = (("text", TEXT), ("image", IMAGE), ("audio", AUDIO))
    id_key: str = "id"
    label_key: str = "label"
    extra: Optional[Tuple[str, ...]] = None
    max_rows_per_read: int = 1024
    required: bool = False  # the default reads whichever of its columns a file has (commands that peek)

    @property
    def needed(self) -> Tuple[str, ...]:
        return tuple(column for column, _ in self.members) if self.required else ()


def row_fields(data: Any, modality: str) -> RowFields:
    """The columns ``modality`` (text, image, audio, pairs) reads from row files, from ``data``."""
    members = {
        "text": ((data.text_key, TEXT),),
        "image": ((data.image_key, IMAGE),),
        "audio": ((data.audio_key, AUDIO),),
        "pairs": ((data.image_key, IMAGE), (data.caption_key, TEXT)),
    }[modality]
    extra = None if data.extra_keys is None else tuple(data.extra_keys)
    return RowFields(members, data.id_key, data.label_key, extra, data.max_rows_per_read, required=True)


def is_row_file(url: str) -> bool:
    return url.lower().endswith(ROW_SUFFIXES)


def is_parquet(url: str) -> bool:
    return url.lower().endswith(PARQUET_SUFFIXES)


def _extension(value: bytes, path: Optional[str], magic: Tuple[Tuple[bytes, str], ...], default: str) -> str:
    if path:
        suffix = PurePath(path).suffix.lower().lstrip(".")
        if suffix:
            return "jpg" if suffix == "jpeg" else suffix
    head = bytes(value[:12])
    for prefix, extension in magic:
        if head.startswith(prefix):
            if prefix == b"RIFF" and extension == "webp" and head[8:12] != b"WEBP":
                continue
            return extension
    return default


def row_sample(row: Optional[Dict[str, Any]], fields: RowFields, error: Optional[str] = None) -> Mapping:
    """One row as a sample's members (``txt``, the media under their extensions, ``cls``, ``json``).
    A bad row (``error``: not JSON, not UTF-8; or a null, empty or missing column) becomes a
    ``BadRow``, which raises ``SampleError`` when a decoder looks at it: inside the decoder's
    call, where the stream counts bad samples under ``data.on_error``."""
    if error is not None:
        return BadRow(error)
    try:
        return _members(row, fields)
    except SampleError as exc:
        return BadRow(str(exc))


def _members(row: Dict[str, Any], fields: RowFields) -> Dict[str, Any]:
    members: Dict[str, Any] = {}
    for column, role in fields.members:
        if column not in row:
            if not fields.required:
                continue
            raise SampleError(f"no column {column!r} (the row has: {', '.join(sorted(map(str, row)))})")
        value = row[column]
        if value is None:
            raise SampleError(f"column {column!r} is null")
        if role == TEXT:
            if isinstance(value, (bytes, bytearray, memoryview)):
                try:
                    value = str(value, "utf-8")
                except UnicodeDecodeError as exc:
                    raise SampleError(f"column {column!r} is not UTF-8 text: {exc}") from None
            if not isinstance(value, str):
                raise SampleError(f"column {column!r} holds {type(value).__name__}, not text")
            if not value or value.isspace():  # isspace stops at the first other character: no copy
                raise SampleError(f"column {column!r} is empty")
            members[TEXT] = value
            continue
        path = None
        if isinstance(value, dict):  # Hugging Face's Image()/Audio() struct
            path, value = value.get("path"), value.get("bytes")
            if value is None:
                raise SampleError(f"column {column!r} holds a path ({path}) but no bytes: the files were not embedded "
                                  "(save with embed_external_files, or convert the dataset with its files)")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise SampleError(f"column {column!r} holds {type(value).__name__}, not encoded bytes")
        if role == IMAGE:
            members[_extension(value, path, _IMAGE_MAGIC, "png")] = value
        else:
            members[_extension(value, path, _AUDIO_MAGIC, "wav")] = value
    label = row.get(fields.label_key)
    if isinstance(label, int) and not isinstance(label, bool):
        members["cls"] = str(label).encode()
    keep = fields.extra
    if keep == ():  # no metadata wanted: nothing to look through
        return members
    used = {column for column, _ in fields.members}
    # Encoded media (bytes, or another {bytes, path} struct) is not metadata.
    metadata = {k: v for k, v in row.items() if k not in used and (keep is None or k in keep)
                and not isinstance(v, (bytes, bytearray, memoryview)) and not (isinstance(v, dict) and "bytes" in v)}
    if metadata:
        members["json"] = orjson.dumps(metadata, default=str)
    return members


def column_samples(columns: Dict[str, list], fields: RowFields, stem: str, first: int) -> List[Tuple[str, Mapping]]:
    """(key, sample) of every row of a unit read column by column (Parquet): the same samples
    as ``row_sample`` row by row, built a column at a time where rows are sound (text that is
    a non-empty string: no per-row function call); any other row goes through ``row_sample``."""
    count = len(next(iter(columns.values()))) if columns else 0
    ids = columns.get(fields.id_key)
    keys = ([str(v) if v is not None and not isinstance(v, (dict, list, bytes)) else f"{stem}:{first + i}"
             for i, v in enumerate(ids)] if ids is not None else [f"{stem}:{first + i}" for i in range(count)])
    texts = [(column, columns[column]) for column, role in fields.members if role == TEXT and column in columns]
    simple = (len(texts) == len(fields.members) == 1 and fields.extra == ()
              and fields.label_key not in columns)
    if not simple:
        names = list(columns)
        return [(key, row_sample(dict(zip(names, values)), fields)) for key, values in zip(keys, zip(*columns.values()))]
    column, values = texts[0]
    samples: List[Tuple[str, Mapping]] = []
    for i, (key, text) in enumerate(zip(keys, values)):
        if type(text) is str and text and not text.isspace():
            samples.append((key, {TEXT: text}))
        else:  # null, empty or not text: the row-by-row path names what is wrong
            samples.append((key, row_sample({name: columns[name][i] for name in columns}, fields)))
    return samples


class BadRow(Mapping):
    """A row that cannot be a sample: any look at its members raises ``SampleError(reason)``."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __getitem__(self, key: str) -> Any:
        raise SampleError(self.reason)

    def __iter__(self) -> Iterator[str]:
        raise SampleError(self.reason)

    def __len__(self) -> int:
        raise SampleError(self.reason)

    def __contains__(self, key: object) -> bool:
        raise SampleError(self.reason)


def row_key(row: Optional[Dict[str, Any]], fields: RowFields, stem: str, number: int) -> str:
    """The sample key: the id column's value, else ``<file stem>:<row number>``."""
    if row is not None:
        value = row.get(fields.id_key)
        if value is not None and not isinstance(value, (dict, list, bytes)):
            return str(value)
    return f"{stem}:{number}"


def file_stem(url: str) -> str:
    name = PurePath(url).name
    for suffix in sorted(ROW_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


@dataclass(frozen=True)
class Unit:
    """A stretch of a row file read as one shard: rows [start, stop) of the file; for
    Parquet its row group, for JSON Lines the seek point it starts at."""

    start: int
    stop: int
    group: int = 0  # Parquet row group, or JSON Lines seek point number
    fault: Optional[str] = None  # damage found when indexing: the unit holds the rows before it


class UnitPositions:
    """What a unit reader shares (mixed into the Parquet and JSON Lines readers): offsets count
    rows within the unit, so skipping is arithmetic and ``samples(offset)`` finds any row; a
    reader is a context manager whose ``close`` drops the unit it holds."""

    def skip(self, count: int, offset: int = 0) -> int:
        return offset + count

    def seek(self, offset: int) -> None:
        """Nothing to do: ``samples(offset)`` finds any row of the unit itself."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def file_units(url: str, fields: RowFields) -> List[Unit]:
    """The units of a local row file (Parquet: its footer; JSON Lines: its index), its
    columns checked against what ``fields`` needs. Raises RowFormatError for a damaged file,
    DataError for a missing column or a missing or stale index."""
    if is_parquet(url):
        from framework.data.formats.parquet import parquet_units

        return parquet_units(url, fields)
    from framework.data.formats.jsonl import jsonl_units

    return jsonl_units(url, fields)


def open_rows(url: str, fields: RowFields, unit: Tuple[int, int, int]) -> Any:
    """A reader of one unit (start row, stop row, group): ``samples(offset)`` yields (key,
    sample, next offset) from row ``start + offset`` on; offsets count rows within the unit."""
    if is_parquet(url):
        from framework.data.formats.parquet import ParquetUnitReader

        return ParquetUnitReader(url, fields, *unit)
    from framework.data.formats.jsonl import JsonlUnitReader

    return JsonlUnitReader(url, fields, *unit)


def with_defaults(fields: Optional[RowFields]) -> RowFields:
    return fields if fields is not None else RowFields()

