"""A lean reader of webdataset tar shards that knows the byte offset of every sample.

Why not ``tarfile``: resuming mid-shard needs the offset where the next sample starts (so
a resumed run seeks there instead of re-reading what it consumed), and small samples need
low per-member overhead. Members are grouped into samples the webdataset way: the key is
the member name up to the first dot of its base name, the rest is the extension.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Dict, Iterator, Tuple, Union

BLOCK = 512
# Member data: bytes, or read-only memoryviews from a memory-mapped shard (data.zero_copy).
# Both are bytes-like: decode with str(value, "utf-8"), io.BytesIO(value), np.frombuffer(value).
Sample = Dict[str, Union[bytes, memoryview]]


class TarFormatError(ValueError):
    """The byte stream is not a (complete) tar archive."""


def _octal(field: bytes) -> int:
    field = field.rstrip(b"\0 ").lstrip(b" ")
    if not field:
        return 0
    if field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    return int(field, 8)


def _pax_path(data: bytes) -> str | None:
    # PAX records: "<len> <key>=<value>\n"
    for record in data.split(b"\n"):
        _, _, keyvalue = record.partition(b" ")
        key, _, value = keyvalue.partition(b"=")
        if key == b"path":
            return value.decode("utf-8")
    return None


def _read_exact(read: Callable[[int], bytes], n: int, offset: int) -> bytes:
    data = read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated tar: wanted {n} bytes at offset {offset}, got {len(data)}")
    return data


def _skip(stream: BinaryIO, n: int, offset: int) -> None:
    try:
        stream.seek(n, 1)
    except (OSError, AttributeError, ValueError):  # pipes and HTTP bodies: read and drop
        while n > 0:
            chunk = stream.read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError(f"truncated tar: member data ends early at offset {offset}")
            n -= len(chunk)


def iter_members(stream: BinaryIO, offset: int = 0, read_data: bool = True) -> Iterator[Tuple[str, bytes, int]]:
    """Yield ``(name, data, header_offset)`` for each regular file, from byte ``offset`` on.

    ``stream`` must already be positioned at ``offset`` (the caller seeks or skips). With
    ``read_data=False`` member data is skipped (seeked over) and ``data`` is empty. A stream
    with ``read_view`` (a mapped shard) gives member data without copying it.
    """
    read_member = getattr(stream, "read_view", stream.read)
    long_name: str | None = None
    header_offset = offset
    while True:
        header = stream.read(BLOCK)
        if len(header) < BLOCK:
            if not header:
                return  # archives without the two zero end blocks still end cleanly
            raise TarFormatError(f"truncated tar header at offset {offset}")
        if header == b"\0" * BLOCK:
            return
        if long_name is None:
            header_offset = offset  # a long-name record belongs to the member after it
        size = _octal(header[124:136])
        typeflag = header[156:157]
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        if read_data or typeflag in (b"L", b"x"):
            # Read exactly the member (one copy), then drop the padding: slicing a padded
            # read would copy every large member a second time.
            data = _read_exact(read_member, size, offset + BLOCK) if size else b""
            if padded > size:
                _read_exact(read_member, padded - size, offset + BLOCK + size)
        else:
            _skip(stream, padded, offset + BLOCK)
            data = b""
        offset += BLOCK + padded
        if typeflag in (b"L",):  # GNU long name for the next member
            long_name = bytes(data).rstrip(b"\0").decode("utf-8")
            continue
        if typeflag in (b"x",):  # PAX extended header for the next member
            long_name = _pax_path(bytes(data)) or long_name
            continue
        if typeflag not in (b"0", b"\0", b"7"):
            long_name = None
            continue  # directories, links, global headers: not sample data
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix and header[257:262] == b"ustar":
                name = prefix.decode("utf-8") + "/" + name
        yield name, data, header_offset


def split_name(name: str) -> Tuple[str, str]:
    """``"dir/key.ext.gz"`` -> ``("dir/key", "ext.gz")`` (webdataset's convention)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def iter_samples(stream: BinaryIO, offset: int = 0) -> Iterator[Tuple[str, Sample, int]]:
    """Yield ``(key, {ext: bytes}, next_offset)``; ``next_offset`` is where the following
    sample starts, so reading can resume there exactly."""
    key: str | None = None
    sample: Sample = {}
    for name, data, header_offset in iter_members(stream, offset):
        member_key, ext = split_name(name)
        if member_key != key:
            if key is not None:
                yield key, sample, header_offset
            key, sample = member_key, {}
        sample[ext] = data
    if key is not None:
        # After the last sample: the end of the archive; a resumed reader finds nothing more.
        yield key, sample, _end_offset(stream)


def _end_offset(stream: BinaryIO) -> int:
    try:
        return stream.tell()
    except (OSError, AttributeError):  # non-seekable streams: any huge offset means "done"
        return 1 << 62


def skip_samples(stream: BinaryIO, count: int, offset: int = 0) -> int:
    """Move past ``count`` samples reading only tar headers; return the offset of the next
    sample (the stream is left positioned there)."""
    if count <= 0:
        return offset
    seen, key = 0, None
    for name, _, header_offset in iter_members(stream, offset, read_data=False):
        member_key, _ = split_name(name)
        if member_key != key:
            if seen == count:
                stream.seek(header_offset)
                return header_offset
            seen, key = seen + 1, member_key
    return _end_offset(stream)
