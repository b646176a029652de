"""What a file is, from its first bytes, and gzip-compressed shards read as plain ones.

A shard that is not what its name claims (a gzip file saved as ``.tar``, a server's HTML
error page, an empty download) should be named for what it is, and a gzip-compressed tar
(``.tar.gz``, ``.tgz``, or a ``.tar`` with gzip's magic bytes) should simply be read.

``GzipStream`` is a file object over the *decompressed* bytes: offsets, ``seek`` and
``tell`` count decompressed bytes, so the tar reader, sample locators and exact resume work
unchanged. Seeking forward decompresses and drops the bytes in between; seeking back
restarts from the beginning: resuming inside a compressed shard re-decompresses it up to
the saved position (zlib inflates a few hundred MB/s on one core; see bench/streaming.py).
A corrupt compressed stream raises ``TarFormatError`` naming the decompressed offset.
"""
from __future__ import annotations

import gzip
import zlib
from collections import deque
from typing import BinaryIO, Deque, Optional

GZIP_MAGIC = b"\x1f\x8b"
GZIP_SUFFIXES = (".tar.gz", ".tgz")
SHARD_SUFFIXES = (".tar", *GZIP_SUFFIXES)

# (magic prefix, what a file starting with it is)
_MAGIC = (
    (GZIP_MAGIC, "gzip magic (1f 8b)"),
    (b"\x28\xb5\x2f\xfd", "zstd magic (28 b5 2f fd): zstd-compressed data; decompress it or write gzip (.tar.gz) shards"),
    (b"BZh", "bzip2 magic (42 5a 68): bzip2-compressed data; decompress it or write gzip (.tar.gz) shards"),
    (b"\xfd7zXZ\x00", "xz magic (fd 37 7a 58 5a 00): xz-compressed data; decompress it or write gzip (.tar.gz) shards"),
    (b"PK\x03\x04", "zip magic (50 4b 03 04): a zip archive, not a tar"),
)


def describe_start(head: bytes) -> str:
    """What a file that fails to parse as tar starts with, in words."""
    if not head:
        return "empty file (0 bytes)"
    for magic, what in _MAGIC:
        if head.startswith(magic):
            return f"starts with {what}"
    text = bytes(head[:64]).lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "starts with an HTML page (a server's error page saved as a shard?)"
    if text.startswith(b"<?xml") or text.startswith(b"<error"):
        return "starts with XML (an object store's error response saved as a shard?)"
    if text.startswith((b"{", b"[")):
        return "starts with JSON text (an error response saved as a shard?)"
    return f"starts with bytes {bytes(head[:8]).hex(' ')} (no known format)"


def is_gzip_name(url: str) -> bool:
    return url.lower().endswith((*GZIP_SUFFIXES, ".gz"))


class GzipStream:
    """A gzip-compressed stream read as its decompressed bytes (see the module docstring).

    Decompressed data comes in blocks of ``BLOCK`` bytes, and what the last ``MARKS`` reads
    returned (at least ``KEEP`` bytes) stays in memory: the tar reader looks one member ahead
    and seeks back to it (a sample ends where the next begins), which on a plain gzip file
    would decompress the shard again from its start. A seek further back does that; a seek
    forward decompresses and drops what lies between.

    ``size`` is None: the decompressed length is unknown until the end (gzip's trailer
    holds it modulo 2**32), so the tar reader finds truncation by short reads here."""

    size: Optional[int] = None
    compression = "gzip"
    BLOCK = 1 << 18
    KEEP = 1 << 18
    MARKS = 4  # a header, its data, a long name: what one member's look-ahead reads

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self._gzip = gzip.GzipFile(fileobj=raw, mode="rb")
        self._buffer = b""  # decompressed bytes [_start, _start + len(_buffer))
        self._start = 0
        self._position = 0
        self._marks: Deque[int] = deque([0], maxlen=self.MARKS)  # where the last reads started

    def _decompressed(self, call, *args):  # type: ignore[no-untyped-def]
        try:
            return call(*args)
        except (zlib.error, EOFError, gzip.BadGzipFile) as exc:
            from framework.data.tar import TarFormatError

            raise TarFormatError(f"corrupt gzip stream after {self._start + len(self._buffer)} decompressed bytes: {exc}") from None

    def read(self, size: int = -1) -> bytes:
        self._marks.append(self._position)
        at = self._position - self._start
        if size < 0:
            size = 1 << 62
        while len(self._buffer) - at < size:
            block = self._decompressed(self._gzip.read, max(self.BLOCK, min(size, 1 << 30) - (len(self._buffer) - at)))
            if not block:
                break
            drop = max(0, min(self._position - self.KEEP, self._marks[0]) - self._start)
            self._buffer = self._buffer[drop:] + block
            self._start += drop
            at -= drop
        data = self._buffer[at : at + size]
        self._position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = {0: 0, 1: self._position, 2: None}[whence]
        if target is None:
            raise OSError("a gzip stream cannot seek from its end")
        target += offset
        end = self._start + len(self._buffer)
        if self._start <= target <= end:
            self._position = target
        elif target > end:  # decompress up to it and drop the bytes between
            self._position = end
            while self._position < target and self.read(min(target - self._position, self.BLOCK)):
                pass
        else:  # before what is kept: decompress again from the start
            self._position = self._decompressed(self._gzip.seek, target)
            self._buffer, self._start = b"", self._position
        return self._position

    def tell(self) -> int:
        return self._position

    def archive_ended(self) -> None:
        ended = getattr(self._raw, "archive_ended", None)
        if ended is not None:
            ended()

    def close(self) -> None:
        try:
            self._gzip.close()
        finally:
            self._raw.close()

    def __enter__(self) -> "GzipStream":
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
