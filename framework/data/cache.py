"""A local cache of remote shards with a size limit (``data.cache_dir``, ``data.cache_limit_gb``).

A remote shard read from its start is copied to the cache as it streams (no second
download) and kept only if the tar archive was read to its end (the tar reader says so; a
gzip-compressed shard is cached compressed, as it was sent); later epochs open the local
copy, which can also seek. Beyond the size limit the least recently used files go.
Several dataloader workers may share one cache: files appear by atomic rename.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO, Optional

class ShardCache:
    def __init__(self, directory: str | Path, limit_bytes: int) -> None:
        self.directory = Path(directory)
        self.limit_bytes = limit_bytes
        self.directory.mkdir(parents=True, exist_ok=True)

    def path(self, url: str) -> Path:
        name = url.rstrip("/").rsplit("/", 1)[-1].replace(" ", "_")[-80:]
        return self.directory / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{name}"

    def lookup(self, url: str) -> Optional[Path]:
        path = self.path(url)
        if path.exists():
            os.utime(path)  # recently used: evicted last
            return path
        return None

    def tee(self, stream: BinaryIO, url: str) -> "CachingReader":
        return CachingReader(stream, self, self.path(url))

    def evict(self) -> None:
        files = [p for p in self.directory.iterdir() if p.is_file() and not p.name.endswith(".tmp")]
        files.sort(key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in files)
        while files and total > self.limit_bytes:
            oldest = files.pop(0)
            total -= oldest.stat().st_size
            oldest.unlink(missing_ok=True)


class CachingReader:
    """Reads a remote stream and writes what it reads to ``<path>.<pid>.tmp``; on close the
    copy becomes the cached shard if the tar reader reached the archive's end."""

    def __init__(self, stream: BinaryIO, cache: ShardCache, path: Path) -> None:
        self.stream, self.cache, self.path = stream, cache, path
        self.tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        self.copy = open(self.tmp, "wb")
        self.complete = False

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.copy.write(data)
        return data

    def archive_ended(self) -> None:
        """Called by the tar reader at the archive's end: what follows is padding."""
        self.complete = True

    def tell(self) -> int:
        return self.copy.tell()

    def seek(self, *_: Any) -> None:
        raise OSError("a shard being cached streams forward only")

    def close(self) -> None:
        try:
            if self.complete:
                while chunk := self.stream.read(1 << 20):  # the few padding blocks after the end marker
                    self.copy.write(chunk)
            self.copy.close()
            if self.complete:
                os.replace(self.tmp, self.path)
                self.cache.evict()
        finally:
            self.tmp.unlink(missing_ok=True)
            self.stream.close()

    def __enter__(self) -> "CachingReader":
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
