"""JSON Lines files (plain, gzip, zstd) as shards, through an index of seek points.

``pretrain data index DIR`` reads each file once and writes, in ``DIR/.pretrain-index/``,
``<file>.json``: its size and mtime (an index that no longer matches its file is refused),
line count, the keys of its first row, and seek points (line number, offset, uncompressed
offset) about every ``rows_per_point`` lines: offsets are byte offsets for plain files,
uncompressed offsets for gzip (whose
access points, each with its 32 KiB window, go to ``<file>.gzidx``, written by
``indexed_gzip``: a zran index), compressed offsets of frame starts for zstd (a file written
as one frame has one seek point: write zstd in frames, as ``zstd --block-size`` or Dolma's
tools do, to resume inside it cheaply). A unit is the stretch between two seek points; a
resumed reader seeks to its unit's point and skips at most that stretch's lines.

A damaged file (a truncated gzip or zstd stream) is indexed up to the damage: its last unit
carries the fault, and ``data.on_error`` decides whether a run reads the lines before it or stops.
"""
from __future__ import annotations

import json
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import orjson

from framework.data.formats import RowFields, RowFormatError, Unit, UnitPositions, file_stem, row_key, row_sample
from framework.errors import DataError

INDEX_DIR = ".pretrain-index"
INDEX_FORMAT = "framework-jsonl-index/1"
ROWS_PER_POINT = 1024
_CHUNK = 1 << 20
_GZIP_SPACING = 1 << 20  # uncompressed bytes between indexed_gzip's access points


def compression(url: str) -> str:
    name = url.lower()
    return "gzip" if name.endswith(".gz") else "zstd" if name.endswith(".zst") else "none"


def index_paths(path: str | Path) -> Tuple[Path, Path]:
    """(the index, the gzip access points) of a JSON Lines file."""
    path = Path(path)
    folder = path.parent / INDEX_DIR
    return folder / f"{path.name}.json", folder / f"{path.name}.gzidx"


# ---------------------------------------------------------------- indexing


class _LineCounter:
    """Counts lines of a decompressed byte stream fed in pieces; notes a seek point at the
    first line start past every ``every`` lines (where the caller allows one)."""

    def __init__(self, every: int) -> None:
        self.every, self.lines, self.offset, self.at_line_start = every, 0, 0, True
        self.points: List[List[int]] = [[0, 0, 0]]
        self.keys: Optional[List[str]] = None
        self._first = b""

    def feed(self, data: bytes, point_offsets: bool = True) -> None:
        """``point_offsets``: seek points are uncompressed offsets (plain, gzip); zstd adds its own."""
        if self.keys is None and len(self._first) < (1 << 16):
            self._first += data[: (1 << 16)]
            if b"\n" in self._first:
                self._note_keys(self._first.split(b"\n", 1)[0])
        start = 0
        while True:
            newline = data.find(b"\n", start)
            if newline < 0:
                break
            self.lines += 1
            start = newline + 1
            if point_offsets and self.lines - self.points[-1][0] >= self.every:
                self.points.append([self.lines, self.offset + start, self.offset + start])
        self.offset += len(data)
        self.at_line_start = data.endswith(b"\n") if data else self.at_line_start

    def finish(self) -> None:
        if not self.at_line_start:  # a last line without its newline
            self.lines += 1
        if self.keys is None and self._first:
            self._note_keys(self._first.split(b"\n", 1)[0])

    def _note_keys(self, line: bytes) -> None:
        import orjson

        try:
            row = orjson.loads(line)
            self.keys = sorted(row) if isinstance(row, dict) else []
        except orjson.JSONDecodeError:
            self.keys = []


def _index_plain(path: str, counter: _LineCounter) -> Optional[str]:
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            counter.feed(chunk)
    return None


def _index_gzip(path: str, counter: _LineCounter, gzidx: Path) -> Optional[str]:
    """zlib counts lines and finds damage (indexed_gzip stops silently at a truncation); then
    indexed_gzip builds its access points, kept only for a sound file."""
    fault = None
    with open(path, "rb") as stream:
        inflate = zlib.decompressobj(wbits=47)  # gzip, several members allowed
        try:
            while chunk := stream.read(_CHUNK):
                while chunk:
                    if inflate.eof:  # another gzip member follows
                        inflate = zlib.decompressobj(wbits=47)
                    counter.feed(inflate.decompress(chunk))
                    chunk = inflate.unused_data if inflate.eof else b""
            if not inflate.eof:
                fault = f"truncated gzip stream (it ends inside line {counter.lines + 1})"
        except zlib.error as exc:
            fault = f"corrupt gzip stream after line {counter.lines}: {exc}"
    if fault is None:
        import indexed_gzip

        with indexed_gzip.IndexedGzipFile(path, spacing=_GZIP_SPACING) as indexed:
            indexed.build_full_index()
            tmp = gzidx.with_name(gzidx.name + ".tmp")
            indexed.export_index(str(tmp))
        os.replace(tmp, gzidx)
    return fault


def _index_zstd(path: str, counter: _LineCounter) -> Optional[str]:
    """Seek points at frame starts that fall on a line start."""
    import zstandard

    context = zstandard.ZstdDecompressor()
    frame_start, fed, inflate = 0, 0, context.decompressobj()
    with open(path, "rb") as stream:
        chunk = stream.read(_CHUNK)
        try:
            while chunk:
                counter.feed(inflate.decompress(chunk), point_offsets=False)
                if inflate.eof:
                    rest = inflate.unused_data
                    frame_start = fed + len(chunk) - len(rest)
                    fed = frame_start
                    if counter.at_line_start and counter.lines - counter.points[-1][0] >= counter.every:
                        counter.points.append([counter.lines, frame_start, counter.offset])
                    inflate = context.decompressobj()
                    chunk = rest or stream.read(_CHUNK)
                    continue
                fed += len(chunk)
                chunk = stream.read(_CHUNK)
        except zstandard.ZstdError as exc:
            return f"corrupt zstd stream after line {counter.lines}: {exc}"
    if fed > frame_start:
        return f"truncated zstd stream (it ends inside a frame, in line {counter.lines + 1})"
    return None


def index_file(path: str | Path, rows_per_point: int = ROWS_PER_POINT) -> Dict[str, Any]:
    """Index one JSON Lines file (see the module docstring); returns the index written."""
    path = str(path)
    index, gzidx = index_paths(path)
    index.parent.mkdir(exist_ok=True)
    stat = os.stat(path)
    counter = _LineCounter(rows_per_point)
    kind = compression(path)
    fault = (_index_gzip(path, counter, gzidx) if kind == "gzip" else _index_zstd(path, counter) if kind == "zstd"
             else _index_plain(path, counter))
    if fault is None:
        counter.finish()
    points = [p for p in counter.points if p[0] < counter.lines] or [[0, 0, 0]]
    record = {"format": INDEX_FORMAT, "file": Path(path).name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
              "compression": kind, "lines": counter.lines, "bytes": counter.offset, "keys": counter.keys or [],
              "points": points, "fault": fault}
    tmp = index.with_name(index.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, index)
    return record


def jsonl_files(paths: List[str]) -> List[Path]:
    """The JSON Lines files named by ``paths`` (files, directories, globs)."""
    import glob

    from framework.data.formats import JSONL_SUFFIXES

    found: List[Path] = []
    for item in paths:
        path = Path(item).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.iterdir() if p.name.lower().endswith(JSONL_SUFFIXES))
        elif any(c in item for c in "*?["):
            found += [Path(p) for p in sorted(glob.glob(item, recursive=True)) if p.lower().endswith(JSONL_SUFFIXES)]
        elif path.is_file():
            found.append(path)
        else:
            raise DataError(f"{item}: no such file or directory")
    if not found:
        raise DataError(f"no JSON Lines files (*{', *'.join(JSONL_SUFFIXES)}) in {', '.join(paths)}")
    return sorted(set(found))


def index_files(paths: List[str], rows_per_point: int = ROWS_PER_POINT, workers: int = 1, force: bool = False,
                report: Any = print) -> Dict[str, Any]:
    """``pretrain data index``: index every JSON Lines file of ``paths`` not indexed yet (or
    all, with ``force``), ``workers`` files at a time. Each index is written atomically when its
    file is done, so an interrupted run resumes with the files left."""
    from concurrent.futures import ProcessPoolExecutor

    from framework.data.files import file_progress

    if rows_per_point < 1:
        raise DataError(f"--rows-per-point must be >= 1, not {rows_per_point}")
    files = jsonl_files(paths)
    todo = [f for f in files if force or not index_is_current(f)]
    report(f"{len(files)} JSON Lines file(s); {len(files) - len(todo)} indexed already, {len(todo)} to index")
    records: List[Dict[str, Any]] = []
    with file_progress("indexing", len(todo)) as update:
        if workers > 1 and len(todo) > 1:
            with ProcessPoolExecutor(min(workers, len(todo))) as pool:
                for record in pool.map(index_file, todo, [rows_per_point] * len(todo)):
                    records.append(record), update(1)
        else:
            for path in todo:
                records.append(index_file(path, rows_per_point)), update(1)
    for record in records:
        if record["fault"]:
            report(f"damaged: {record['file']}: {record['fault']} ({record['lines']} whole lines before it are read; "
                   "data.on_error decides)")
    lines = sum(r["lines"] for r in records)
    report(f"indexed {len(records)} file(s): {lines} lines, {sum(len(r['points']) for r in records)} seek points")
    return {"files": len(files), "indexed": len(records), "lines": lines, "damaged": sum(bool(r["fault"]) for r in records)}


def index_is_current(path: str | Path) -> bool:
    try:
        _read_index(str(path))
        return True
    except DataError:
        return False


def _read_index(path: str) -> Dict[str, Any]:
    index, gzidx = index_paths(path)
    folder = Path(path).parent
    try:
        record = _cached_index(str(index), index.stat().st_mtime_ns)
    except FileNotFoundError:
        raise DataError(f"{path}: JSON Lines needs an index of its lines and seek points; write it once with "
                        f"`pretrain data index {folder}` (reused by every run)") from None
    stat = os.stat(path)
    if record.get("format") != INDEX_FORMAT or record["size"] != stat.st_size or record["mtime_ns"] != stat.st_mtime_ns:
        raise DataError(f"{path}: its index {index} was written for another version of the file (size or modification "
                        f"time changed); index it again: `pretrain data index {folder}`")
    if record["compression"] == "gzip" and record["fault"] is None and not gzidx.is_file():
        raise DataError(f"{path}: its gzip access points {gzidx} are missing; `pretrain data index {folder}` again")
    return record


@lru_cache(maxsize=256)
def _cached_index(index: str, mtime_ns: int) -> Dict[str, Any]:
    return json.loads(Path(index).read_text())


def jsonl_units(url: str, fields: RowFields) -> List[Unit]:
    path = url.removeprefix("file://")
    if not os.path.exists(path):
        raise FileNotFoundError(path)
    record = _read_index(path)
    keys = record["keys"]
    missing = [c for c in fields.needed if keys and c not in keys]
    if missing:
        raise DataError(f"{url}: no key {missing[0]!r} in its rows; the first row has: {', '.join(keys)} (choose with "
                        "data.text_key, data.image_key, data.audio_key or data.caption_key)")
    points, lines = record["points"], record["lines"]
    units = [Unit(point[0], points[i + 1][0] if i + 1 < len(points) else lines, i) for i, point in enumerate(points)]
    units = [u for u in units if u.stop > u.start]
    if record["fault"] is not None:
        last = units[-1] if units else Unit(0, 0, 0)
        units = units[:-1] + [Unit(last.start, last.stop, last.group, record["fault"])]
    return units


# ---------------------------------------------------------------- reading


class JsonlUnitReader(UnitPositions):
    """Lines [start, stop) from seek point ``group``, read in one go when first asked for (one
    unit in memory, like a Parquet stretch); ``samples(offset)`` from line start + offset."""

    def __init__(self, url: str, fields: RowFields, start: int, stop: int, group: int) -> None:
        self.url, self.path, self.fields = url, url.removeprefix("file://"), fields
        self.start, self.stop, self.group = start, stop, group
        self._stem = file_stem(url)
        self._lines: Optional[List[bytes]] = None
        self._length: Optional[int] = None  # the unit's decompressed bytes, from the index (set by _open)

    def _open(self) -> Any:
        record = _read_index(self.path)
        points = record["points"]
        line, offset, decompressed = points[self.group]
        # the unit's length in (decompressed) bytes: read in one call, no further
        following = points[self.group + 1][2] if self.group + 1 < len(points) else record["bytes"]
        self._length = following - decompressed if record["fault"] is None else None
        if line != self.start:
            raise DataError(f"{self.url}: seek point {self.group} is at line {line}, the plan expected {self.start}: "
                            f"the index changed since planning; index it again")
        kind = record["compression"]
        if kind == "gzip":
            import indexed_gzip

            gzidx = index_paths(self.path)[1]  # absent for a damaged file: then built while seeking
            stream = indexed_gzip.IndexedGzipFile(self.path, index_file=str(gzidx) if gzidx.is_file() else None)
            stream.seek(offset)
            return stream
        raw = open(self.path, "rb")
        raw.seek(offset)
        if kind == "zstd":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
        return raw

    def _load(self) -> List[bytes]:
        """The unit's lines (without their newlines): whole chunks read and split, not line by line."""
        count, lines, tail = self.stop - self.start, [], b""
        try:
            with self._open() as stream:
                while len(lines) < count:
                    chunk = stream.read(self._length or _CHUNK)
                    self._length = None  # (a read may return less: go on in chunks)
                    if not chunk:
                        if tail:
                            lines.append(tail)  # the file's last line, without its newline
                        break
                    pieces = (tail + chunk).split(b"\n")
                    tail = pieces.pop()
                    lines.extend(pieces)
        except DataError:
            raise
        except Exception as exc:  # OSError, zstandard.ZstdError, indexed_gzip's ZranError, zlib's errors
            raise RowFormatError(f"reading from line {self.start + len(lines) + 1}: {exc}") from None
        return lines[:count]  # fewer than indexed when the file ends early: the stream reports the shortfall

    def samples(self, offset: int = 0) -> Iterator[Tuple[str, Any, int]]:
        if self._lines is None:
            self._lines = self._load()
        fields, stem, first = self.fields, self._stem, self.start
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        for index in range(offset, len(self._lines)):
            line = self._lines[index]
            row, error = None, None
            try:
                row = loads(line)
                if type(row) is not dict:
                    row, error = None, f"line {first + index + 1} is JSON {type(row).__name__}, not an object"
            except decode_error as exc:
                error = _line_error(line, first + index + 1, exc)
            yield row_key(row, fields, stem, first + index), row_sample(row, fields, error), index + 1

    def close(self) -> None:
        self._lines = None


def _line_error(line: bytes, number: int, exc: Exception) -> str:
    if not line.strip():
        return f"line {number} is empty"
    try:
        line.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"line {number} is not UTF-8: {bad}"
    return f"line {number} is not JSON: {exc}"
