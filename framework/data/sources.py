"""Resolve a shard spec from the config into shards, count their samples, open them.

A spec is a string or a list. A string is a directory of ``.tar`` shards (or ``.tar.gz``,
``.tgz``; its ``manifest.json`` supplies per-shard sample counts) or of row files (``.parquet``,
``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``: each cut into units, one ``Shard`` per unit, see
framework/data/formats/), a shard or row file, a brace pattern
(``shards-{000000..000099}.tar``), a glob, or a URL: ``http(s)://``, ``s3://``, ``gs://``
(any fsspec protocol) or ``pipe:<command writing the shard to stdout>``. A list may mix
these, or hold sources with weights for resampled mode:
``[{shards: web/, weight: 0.7}, {shards: code/, weight: 0.3}]``.

``check_shards`` is the planning step: shards are counted where no manifest gave counts,
and those that are missing, empty or damaged follow ``data.on_error`` (framework/data/faults.py).
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, Iterator, List, Optional, Tuple

from braceexpand import braceexpand

from framework.data.cache import ShardCache
from framework.data.compressed import GZIP_MAGIC, SHARD_SUFFIXES, GzipStream, is_gzip_name
from framework.data.faults import report_fault
from framework.data.formats import ROW_SUFFIXES, RowFields, file_units, is_row_file, open_rows, with_defaults
from framework.data.manifest import read_manifest
from framework.data.tar import TarFormatError, iter_members, iter_samples, skip_samples, split_name
from framework.errors import DataError

# Reads larger than the buffer bypass it (one copy for big members); small members
# (text) are still served from it without a system call each.
_READ_BUFFER = 1 << 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None  # from the manifest, or counted
    fault: Optional[str] = None  # why planning found it unusable (data.on_error=skip); samples then counts what precedes the damage
    rows: Optional[Tuple[int, int, int]] = None  # a row file's unit: (first row, end row, row group or seek point)
    fields: Optional[RowFields] = None  # a row file's columns, as the modality reads them


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _shard_files(directory: Path) -> List[Path]:
    return sorted({p for suffix in (*SHARD_SUFFIXES, *ROW_SUFFIXES) for p in directory.glob(f"*{suffix}")})


def _from_directory(directory: Path, key: str) -> List[Shard | str]:
    manifest = read_manifest(directory)
    if manifest is not None:
        # Listed shards that are missing are planning faults (see check_shards), not errors here.
        return [Shard(str(directory / s["path"]), int(s["samples"])) for s in manifest["shards"]]
    files = _shard_files(directory)
    if not files:
        raise DataError(f"{key}: no shards (*.tar, *.tar.gz, *.tgz) or row files (*{', *'.join(ROW_SUFFIXES)}) in "
                        f"directory {directory}")
    return [str(p) for p in files]


def _row_units(url: str, fields: Optional[RowFields]) -> List[Shard]:
    """A row file as one shard per unit; a damaged file as one faulty shard (a planning fault)."""
    fields = with_defaults(fields)
    try:
        units = file_units(url, fields)
    except FileNotFoundError:
        return [Shard(url, 0, "shard not found", (0, 0, 0), fields)]
    except TarFormatError as exc:
        return [Shard(url, 0, str(exc), (0, 0, 0), fields)]
    return [Shard(url, u.stop - u.start, u.fault, (u.start, u.stop, u.group), fields) for u in units]


def _expand(item: str, key: str, fields: Optional[RowFields] = None) -> List[Shard]:
    if is_remote(item):
        if is_row_file(item):
            raise DataError(f"{key}: {item}: row files (Parquet, JSON Lines) are read from a local or mounted file "
                            "system; copy them there, or convert them to tar shards (`pretrain shards ... --input`)")
        return [Shard(url) for url in braceexpand(item)]
    path = Path(item).expanduser()
    if path.is_dir():
        found = _from_directory(path, key)
    elif "{" in item:
        found = list(braceexpand(str(path)))
    elif any(c in item for c in "*?["):
        found = sorted(glob.glob(str(path), recursive=True))
        if not found:
            raise DataError(f"{key}: glob {item!r} matches no shard")
    else:
        found = [str(path)]
    shards: List[Shard] = []
    for entry in found:
        if isinstance(entry, Shard):
            shards.append(entry)
        elif is_row_file(entry):
            shards.extend(_row_units(entry, fields))
        else:
            shards.append(Shard(entry))
    return shards


def resolve_sources(spec: Any, key: str = "data.train", fields: Optional[RowFields] = None
                    ) -> Tuple[List[Shard], List[Tuple[int, int]], List[float]]:
    """(all shards, [first, last) shard range of each source, weight of each source). Row
    files become one shard per unit, read with ``fields`` (default: a ``text`` column)."""
    if spec is None or spec == "" or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        raise DataError(f"{key} is empty: give a directory of .tar shards, a .tar file, a brace pattern, a glob or a URL")
    items = [spec] if isinstance(spec, (str, dict)) or hasattr(spec, "keys") else list(spec)
    shards: List[Shard] = []
    ranges: List[Tuple[int, int]] = []
    weights: List[float] = []
    plain: List[Shard] = []
    for number, item in enumerate(items):
        if isinstance(item, str) and item:
            plain.extend(_expand(item, key, fields))
            continue
        if hasattr(item, "keys"):
            unknown = set(item.keys()) - {"shards", "weight", "name"}
            if unknown or "shards" not in item:
                raise DataError(f"{key}[{number}]: a source is {{shards: <spec>, weight: <number>}}, got keys {sorted(item.keys())}")
            weight = float(item.get("weight", 1.0))
            if not weight > 0:
                raise DataError(f"{key}[{number}].weight must be positive, not {weight}")
            source, _, _ = resolve_sources(item["shards"], f"{key}[{number}].shards", fields)
            ranges.append((len(shards), len(shards) + len(source)))
            weights.append(weight)
            shards.extend(source)
            continue
        raise DataError(f"{key}: {item!r} is not a shard path")
    if plain:
        ranges.append((len(shards), len(shards) + len(plain)))
        weights.append(1.0)
        shards.extend(plain)
    local = [s.url for s in shards if not is_remote(s.url)]
    if local and len(local) == len(shards) and not any(os.path.exists(url.removeprefix("file://")) for url in local):
        # Not one shard exists: a wrong path, not a damaged corpus (one missing shard among
        # many is a planning fault under data.on_error, see check_shards).
        raise DataError(f"{key}: shard not found: {local[0]}" + (f" (nor any of the other {len(local) - 1})" if len(local) > 1 else ""))
    return shards, ranges, weights


def resolve_shards(spec: Any, key: str = "data.train", fields: Optional[RowFields] = None) -> List[Shard]:
    """Expand ``spec`` into shards (see ``check_shards`` for what is checked in them)."""
    return resolve_sources(spec, key, fields)[0]


def open_shard(url: str, offset: int = 0, cache: "Optional[ShardCache]" = None, zero_copy: bool = False) -> BinaryIO:
    """Open a shard for reading, positioned at byte ``offset`` of its tar stream; remote
    shards go through ``cache`` when one is given. With ``zero_copy`` a local (or cached)
    shard is memory-mapped and the tar reader hands out its members as memoryviews of the
    mapping (see MappedShard). A gzip-compressed shard (``.tar.gz``, ``.tgz``; locally also
    any name with gzip's magic bytes) is read decompressed, offsets counting decompressed
    bytes (see framework/data/compressed.py): a resume inside it re-reads it up to ``offset``."""
    if cache is not None and is_remote(url):
        cached = cache.lookup(url)
        if cached is not None:
            return open_shard(str(cached), offset, zero_copy=zero_copy)
        if offset == 0:
            tee = cache.tee(_open_remote(url, 0), url)  # caches the bytes as they are (compressed)
            return GzipStream(tee) if is_gzip_name(url) else tee
    if is_remote(url):
        if is_gzip_name(url):
            return _positioned(GzipStream(_open_remote(url, 0)), offset)
        return _open_remote(url, offset)
    path = url.removeprefix("file://")
    stream = open(path, "rb", buffering=_READ_BUFFER)
    if os.pread(stream.fileno(), 2, 0) == GZIP_MAGIC:
        return _positioned(GzipStream(stream), offset)
    if zero_copy:
        stream.close()
        return MappedShard(path, offset)
    return _positioned(stream, offset)


class TarReader:
    """A tar shard's samples from a byte offset: what ``open_reader`` gives for tar shards."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream

    def skip(self, count: int, offset: int = 0) -> int:
        """Past ``count`` samples from ``offset`` (headers only); the offset reached."""
        return skip_samples(self.stream, count, offset)

    def seek(self, offset: int) -> None:
        self.stream.seek(offset)

    def samples(self, offset: int = 0) -> Iterator[Tuple[str, Any, int]]:
        """(key, sample, next offset) from ``offset``, where the stream must be."""
        return iter_samples(self.stream, offset)

    def close(self) -> None:
        self.stream.close()

    def __enter__(self) -> "TarReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()


def open_reader(shard: Shard, offset: int = 0, cache: "Optional[ShardCache]" = None, zero_copy: bool = False) -> Any:
    """A reader of ``shard``'s samples (``skip``, ``seek``, ``samples(offset)``, a context
    manager): a tar shard at byte ``offset``; a row file's unit, whose offsets count its rows."""
    if shard.rows is not None:
        return open_rows(shard.url, with_defaults(shard.fields), shard.rows)
    return TarReader(open_shard(shard.url, offset, cache, zero_copy))


def iter_shard(shard: Shard, bad_rows: bool = False) -> Iterator[Tuple[str, Any]]:
    """Every (key, sample) of a shard, in order: for commands that read whole shards. A row
    file's bad rows are warned about and left out, unless ``bad_rows`` (the caller names them)."""
    from framework.data.formats import BadRow

    with open_reader(shard) as reader:
        for key, sample, _ in reader.samples(0):
            if isinstance(sample, BadRow) and not bad_rows:
                report_fault(f"shard {shard.url}, sample {key}", sample.reason, "skip")
                continue
            yield key, sample


def announce_commands(shards: List[Shard], key: str) -> None:
    """Say at start that ``pipe:`` sources run shell commands written in the config (a config is
    code when it has them: run only configs you trust)."""
    commands = [s.url[5:] for s in shards if s.url.startswith("pipe:")]
    if commands:
        log.warning("%s: %d pipe: source(s) run shell commands from the config, e.g. %s", key, len(commands), commands[0])


def _open_remote(url: str, offset: int) -> BinaryIO:
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=_READ_BUFFER)
        stream = _PipeStream(process, url)
        stream.discard(offset)
        return stream
    import fsspec

    if offset:
        try:  # a resume: seek with range requests (object stores and most servers have them)
            stream = fsspec.open(url, "rb", block_size=_READ_BUFFER).open()
            stream.seek(offset)
            stream.read(1)
            stream.seek(offset)
            return stream
        except ValueError:
            pass  # no range requests: stream from the start and drop what precedes offset
    # sequential: one request per shard
    return _positioned(_WholeReads(fsspec.open(url, "rb", block_size=0).open()), offset)


def _positioned(stream: BinaryIO, offset: int) -> BinaryIO:
    if offset:
        try:
            stream.seek(offset)
        except (OSError, ValueError):
            _discard(stream, offset)
    return stream


def _discard(stream: BinaryIO, n: int) -> None:
    while n > 0:
        chunk = stream.read(min(n, _READ_BUFFER))
        if not chunk:
            return
        n -= len(chunk)


class MappedShard:
    """A local shard mapped into memory: ``read`` copies (tar headers), ``read_view`` does not.

    Member data comes out as read-only memoryviews of the page cache: no copy and no
    allocation per sample, so large undecoded samples (pre-tokenized arrays, video for a GPU
    decoder) cost only their tar header. The mapping lives as long as any view of it; the
    file must not be truncated while views are alive (shards are immutable: writers rename
    finished files into place, so a rewrite gets a new inode and old mappings stay valid).
    """

    def __init__(self, path: str, offset: int = 0) -> None:
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            # an empty file cannot be mapped; it reads as an empty (truncated) archive
            self._map = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._view = memoryview(self._map)
        self._position = min(offset, len(self._view))

    @property
    def size(self) -> int:
        return len(self._view)

    def read(self, n: int = -1) -> bytes:
        return bytes(self.read_view(n))

    def read_view(self, n: int = -1) -> memoryview:
        end = len(self._view) if n < 0 else min(self._position + n, len(self._view))
        view = self._view[self._position : end]
        self._position = end
        return view

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: len(self._view)}[whence]
        self._position = max(0, min(base + offset, len(self._view)))
        return self._position

    def tell(self) -> int:
        return self._position

    def close(self) -> None:
        self._view.release()  # views handed out keep the mapping alive on their own

    def __enter__(self) -> "MappedShard":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WholeReads:
    """An HTTP body read as a file: ``read(n)`` returns n bytes unless the body ends first.

    fsspec's streaming HTTP file hands back whatever the socket has buffered, which on a slow
    link is part of a tar header; the tar reader (and the cache's end-marker check) read whole
    blocks, as every file object they otherwise meet gives them."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream

    def read(self, n: int = -1) -> bytes:
        data = self._stream.read(n)
        if n < 0 or len(data) >= n or not data:
            return data
        pieces = [data]
        missing = n - len(data)
        while missing > 0 and (piece := self._stream.read(missing)):
            pieces.append(piece)
            missing -= len(piece)
        return b"".join(pieces)

    def __getattr__(self, name: str) -> Any:  # seek, tell, close: the stream's own
        return getattr(self._stream, name)

    def __enter__(self) -> "_WholeReads":
        return self

    def __exit__(self, *_: Any) -> None:
        self._stream.close()


class _PipeStream:
    """stdout of a ``pipe:`` command; a non-zero exit status is an error naming the command."""

    def __init__(self, process: subprocess.Popen, url: str) -> None:
        self.process, self.url, self.position = process, url, 0

    def read(self, n: int = -1) -> bytes:
        data = self.process.stdout.read(n)
        self.position += len(data)
        if (n < 0 or len(data) < n) and self.process.wait() != 0:
            raise OSError(f"{self.url} exited with status {self.process.returncode}")
        return data

    def discard(self, n: int) -> None:
        _discard(self, n)

    def tell(self) -> int:
        return self.position

    def seek(self, *_: Any) -> None:
        raise OSError("a pipe: stream cannot seek")

    def __enter__(self) -> "_PipeStream":
        return self

    def close(self) -> None:
        self.process.stdout.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def __exit__(self, *_: Any) -> None:
        self.close()


def _count(url: str) -> Tuple[int, Optional[str]]:
    """(samples, None) for a sound shard; (samples before the damage, reason) for a bad one.
    Reads tar headers only, each validated (see tar.iter_members)."""
    count, key, extensions = 0, None, set()
    try:
        with open_shard(url) as stream:
            for name, _, offset in iter_members(stream, 0, read_data=False):
                member_key, extension = split_name(name)
                if member_key != key:
                    count, key, extensions = count + 1, member_key, set()
                elif extension in extensions:  # as iter_samples refuses it
                    raise TarFormatError(f"member {name} at offset {offset} repeats a member of sample {key}")
                extensions.add(extension)
    except FileNotFoundError:
        return 0, "shard not found"
    except (TarFormatError, OSError) as exc:
        return max(count - 1, 0), str(exc)  # the sample in progress may lack members: not counted
    return count, None


def count_samples(url: str, on_error: str = "raise") -> int:
    """Count a shard's samples by reading its tar headers only. A damaged shard follows
    ``on_error``: an error naming it, or a warning and the samples before the damage."""
    count, fault = _count(url)
    if fault is not None:
        report_fault(f"shard {url}", fault, on_error)
    return count


def check_shards(shards: List[Shard], on_error: str = "raise", count: bool = True, key: str = "data.train",
                 announce: bool = True) -> List[Shard]:
    """The planning step: each shard checked, and counted (headers only) where no manifest
    gave its sample count and ``count`` asks for one (epoch mode).

    A shard that is missing, empty or not a sound tar follows ``on_error``: ``raise`` stops
    with its name; ``skip`` logs it (when ``announce``: rank 0) and marks it with its
    ``fault``, its count being the samples before the damage (the stream counts it in
    ``data/skipped_shards``). Shards whose count came from a manifest are not opened here:
    under ``skip`` the stream finds and counts their damage as it reads them (with the
    samples lost); under ``raise`` each must at least exist and not be empty."""
    remote = [s.url for s in shards if s.samples is None and is_remote(s.url)]
    if count and remote:
        raise DataError(
            f"epoch mode needs sample counts, and remote shards without a manifest have none (e.g. {remote[0]}); "
            "write a manifest.json beside them or use data.mode=resampled"
        )
    checked: List[Shard] = []
    for shard in shards:
        fault = None
        if shard.rows is not None:  # a row file's unit: counted from its footer or index when resolved
            if shard.fault is not None:
                report_fault(f"shard {shard.url}", shard.fault, on_error, announce)
            checked.append(shard)
            continue
        if is_remote(shard.url) or (shard.samples is not None and on_error != "raise"):
            checked.append(shard)
            continue
        if shard.samples is None and count:
            samples, fault = _count(shard.url)
            shard = replace(shard, samples=samples)
        else:
            fault = _stat_fault(shard.url.removeprefix("file://"))
        if fault is not None:
            report_fault(f"shard {shard.url}", fault, on_error, announce)
            shard = replace(shard, fault=fault)
        checked.append(shard)
    if all(s.fault is not None for s in checked) and not any(s.samples for s in checked):
        raise DataError(f"{key}: none of its {len(checked)} shard(s) can be read ({checked[0].url}: {checked[0].fault})")
    return checked


def _stat_fault(path: str) -> Optional[str]:
    try:
        return "empty file (0 bytes)" if os.path.getsize(path) == 0 else None
    except OSError:
        return "shard not found"


def with_counts(shards: List[Shard], on_error: str = "raise", announce: bool = True) -> List[Shard]:
    """Shards with their sample counts (``check_shards`` for epoch mode)."""
    return check_shards(shards, on_error, count=True, announce=announce)
