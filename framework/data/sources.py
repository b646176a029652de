"""Resolve a shard spec from the config into shards, count their samples, open them.

A spec is a string or a list. A string is a directory of ``.tar`` shards (its
``manifest.json`` supplies per-shard sample counts), a ``.tar`` file, a brace pattern
(``shards-{000000..000099}.tar``), a glob, or a URL: ``http(s)://``, ``s3://``, ``gs://``
(any fsspec protocol) or ``pipe:<command writing the shard to stdout>``. A list may mix
these, or hold sources with weights for resampled mode:
``[{shards: web/, weight: 0.7}, {shards: code/, weight: 0.3}]``.
"""
from __future__ import annotations

import glob
import logging
import mmap
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, List, Optional, Tuple

from braceexpand import braceexpand

from framework.data.cache import ShardCache
from framework.data.manifest import read_manifest
from framework.errors import DataError

# Reads larger than the buffer bypass it (one copy for big members); small members
# (text) are still served from it without a system call each.
_READ_BUFFER = 1 << 16
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None  # from the manifest, or counted


def is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def _from_directory(directory: Path, key: str) -> List[Shard]:
    manifest = read_manifest(directory)
    if manifest is not None:
        shards = [Shard(str(directory / s["path"]), int(s["samples"])) for s in manifest["shards"]]
        missing = [s.url for s in shards if not os.path.exists(s.url)]
        if missing:
            raise DataError(f"{key}: {directory}/manifest.json lists shards that do not exist: {missing[:3]}")
        return shards
    tars = sorted(directory.glob("*.tar"))
    if not tars:
        raise DataError(f"{key}: no .tar shards in directory {directory}")
    return [Shard(str(p)) for p in tars]


def _expand(item: str, key: str) -> List[Shard]:
    if is_remote(item):
        return [Shard(url) for url in braceexpand(item)]
    path = Path(item).expanduser()
    if path.is_dir():
        return _from_directory(path, key)
    if "{" in item:
        return [Shard(p) for p in braceexpand(str(path))]
    if any(c in item for c in "*?["):
        matches = sorted(glob.glob(str(path), recursive=True))
        if not matches:
            raise DataError(f"{key}: glob {item!r} matches no shard")
        return [Shard(p) for p in matches]
    return [Shard(str(path))]


def _check_local(shards: List[Shard], key: str) -> None:
    for shard in shards:
        if is_remote(shard.url):
            continue
        if not os.path.exists(shard.url):
            raise DataError(f"{key}: shard not found: {shard.url}")
        if os.path.getsize(shard.url) == 0:
            raise DataError(f"{key}: shard is empty (0 bytes): {shard.url}")


def resolve_sources(spec: Any, key: str = "data.train") -> Tuple[List[Shard], List[Tuple[int, int]], List[float]]:
    """(all shards, [first, last) shard range of each source, weight of each source)."""
    if spec is None or spec == "" or (isinstance(spec, (list, tuple)) and len(spec) == 0):
        raise DataError(f"{key} is empty: give a directory of .tar shards, a .tar file, a brace pattern, a glob or a URL")
    items = [spec] if isinstance(spec, (str, dict)) or hasattr(spec, "keys") else list(spec)
    shards: List[Shard] = []
    ranges: List[Tuple[int, int]] = []
    weights: List[float] = []
    plain: List[Shard] = []
    for number, item in enumerate(items):
        if isinstance(item, str) and item:
            plain.extend(_expand(item, key))
            continue
        if hasattr(item, "keys"):
            unknown = set(item.keys()) - {"shards", "weight", "name"}
            if unknown or "shards" not in item:
                raise DataError(f"{key}[{number}]: a source is {{shards: <spec>, weight: <number>}}, got keys {sorted(item.keys())}")
            weight = float(item.get("weight", 1.0))
            if not weight > 0:
                raise DataError(f"{key}[{number}].weight must be positive, not {weight}")
            source, _, _ = resolve_sources(item["shards"], f"{key}[{number}].shards")
            ranges.append((len(shards), len(shards) + len(source)))
            weights.append(weight)
            shards.extend(source)
            continue
        raise DataError(f"{key}: {item!r} is not a shard path")
    if plain:
        ranges.append((len(shards), len(shards) + len(plain)))
        weights.append(1.0)
        shards.extend(plain)
    _check_local(shards, key)
    return shards, ranges, weights


def resolve_shards(spec: Any, key: str = "data.train") -> List[Shard]:
    """Expand ``spec`` into shards, checking that each local one exists and is not empty."""
    return resolve_sources(spec, key)[0]


def open_shard(url: str, offset: int = 0, cache: "Optional[ShardCache]" = None, zero_copy: bool = False) -> BinaryIO:
    """Open a shard for reading, positioned at byte ``offset``; remote shards go through
    ``cache`` when one is given. With ``zero_copy`` a local (or cached) shard is memory-mapped
    and the tar reader hands out its members as memoryviews of the mapping (see MappedShard)."""
    if cache is not None and is_remote(url):
        cached = cache.lookup(url)
        if cached is not None:
            return open_shard(str(cached), offset, zero_copy=zero_copy)
        if offset == 0:
            return cache.tee(open_shard(url), url)
    if url.startswith("pipe:"):
        process = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, bufsize=_READ_BUFFER)
        stream = _PipeStream(process, url)
        stream.discard(offset)
        return stream
    if "://" in url and not url.startswith("file://"):
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
        stream = _WholeReads(fsspec.open(url, "rb", block_size=0).open())
    elif zero_copy:
        return MappedShard(url.removeprefix("file://"), offset)
    else:
        stream = open(url.removeprefix("file://"), "rb", buffering=_READ_BUFFER)
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

    def __exit__(self, *_: Any) -> None:
        self.process.stdout.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def count_samples(url: str, on_error: str = "raise") -> int:
    """Count a shard's samples by reading its tar headers only. Under ``on_error="skip"`` a
    damaged shard counts the samples before the damage, with a warning naming it."""
    from framework.data.tar import TarFormatError, iter_members, split_name

    count, key = 0, None
    try:
        with open_shard(url) as stream:
            for name, _, _ in iter_members(stream, 0, read_data=False):
                member_key = split_name(name)[0]
                if member_key != key:
                    count, key = count + 1, member_key
    except (TarFormatError, OSError) as exc:
        if on_error == "raise":
            raise DataError(f"cannot count the samples of shard {url}: {exc}") from exc
        log.warning("shard %s is damaged after %d samples (%s): counting those", url, max(count - 1, 0), exc)
        return max(count - 1, 0)  # the last one may be cut short
    return count


def with_counts(shards: List[Shard], on_error: str = "raise") -> List[Shard]:
    """Shards with their sample counts, counting (headers only) where no manifest gave them."""
    missing = [s for s in shards if s.samples is None]
    if not missing:
        return shards
    remote = [s.url for s in missing if is_remote(s.url)]
    if remote:
        raise DataError(
            f"epoch mode needs sample counts, and remote shards without a manifest have none (e.g. {remote[0]}); "
            "write a manifest.json beside them or use data.mode=resampled"
        )
    return [s if s.samples is not None else replace(s, samples=count_samples(s.url, on_error)) for s in shards]
