"""A lean reader of webdataset tar shards that knows the byte offset of every sample and
validates what it reads.

Why not ``tarfile``: resuming mid-shard needs the offset where the next sample starts (so
a resumed run seeks there instead of re-reading what it consumed), and small samples need
low per-member overhead. Members are grouped into samples the webdataset way: the key is
the member name up to the first dot of its base name, the rest is the extension.

Every header is checked before it is trusted: its checksum, its numeric fields (octal, or
GNU base-256), and the member's declared size against the bytes the file still has. A
failure is a ``TarFormatError`` with the byte offset and the reason; at the start of a file
it says what the file is instead (gzip, zstd, an HTML error page, empty). Names that are
not UTF-8 are decoded with backslash escapes, never an error.
"""
from __future__ import annotations

import os
from typing import Any, BinaryIO, Callable, Dict, Iterator, Optional, Tuple, Union

from zlib import adler32

from framework.data.compressed import describe_start

BLOCK = 512
ZERO_BLOCK = b"\0" * BLOCK
_OCTAL_DIGITS = b"01234567"
_ONE_READ = 8192  # members up to this size (padded) are read with their padding in one call
_REGULAR = (ord("0"), 0, ord("7"))  # type flags of regular (and contiguous) files: sample data
_LONG_NAME, _PAX = ord("L"), ord("x")
# Member data: bytes, or read-only memoryviews from a memory-mapped shard (data.zero_copy).
# Both are bytes-like: decode with str(value, "utf-8"), io.BytesIO(value), np.frombuffer(value).
Sample = Dict[str, Union[bytes, memoryview]]


class TarFormatError(ValueError):
    """The byte stream is not a (complete, sound) tar archive; the message says where and why."""


def _text(raw: bytes) -> str:
    # Names are bytes in tar; a name that is not UTF-8 is still a name (escaped, printable).
    return raw.decode("utf-8", "backslashreplace")


def _number(field: bytes, what: str, offset: int) -> int:
    """A header's numeric field: octal digits (NUL/space padded) or GNU base-256."""
    if field[0] & 0x80:
        if field[0] & 0x40:  # base-256 with the sign bit: negative, never valid here
            raise TarFormatError(f"header at offset {offset}: negative {what} field")
        return int.from_bytes(bytes([field[0] & 0x7F]) + field[1:], "big")
    end = field.find(b"\0")
    digits = (field if end < 0 else field[:end]).strip(b" ")
    if digits.translate(None, _OCTAL_DIGITS):
        raise TarFormatError(f"header at offset {offset}: {what} field {bytes(field)!r} is not an octal number")
    return int(digits, 8) if digits else 0


def _header_sum(header: bytes) -> int:
    """The header's byte sum with its checksum field counted as spaces. zlib's adler32 keeps
    1 + the byte sum modulo 65521 in its low half; 256 bytes sum to at most 65280, so two
    halves give the exact sum at C speed (the checksum runs once per member; _scan inlines it)."""
    return (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - (adler32(header[148:156]) & 0xFFFF) + 255


def _signed_sum(header: bytes) -> int:
    # Some old writers summed signed chars; tarfile accepts both, and so do we.
    return sum(b - 256 if b > 127 else b for b in header[:148] + b" " * 8 + header[156:])


def _fields(header: bytes, offset: int) -> Tuple[int, int]:
    """(declared size, stored checksum), strictly: the slow path's parse and its errors."""
    return _number(header[124:136], "size", offset), _number(header[148:156], "checksum", offset)


def _checksum_error(header: bytes, stored: int, offset: int) -> Optional[TarFormatError]:
    if stored == _header_sum(header) or stored == _signed_sum(header):
        return None
    return TarFormatError(f"header checksum mismatch at offset {offset}")


def _not_a_tar(header: bytes, stream: BinaryIO, exc: TarFormatError) -> TarFormatError:
    """The error for a file whose very first header fails: say what the file is instead."""
    what = describe_start(header)
    if what.startswith("starts with gzip magic"):
        what += ": a gzip-compressed tar; name it .tar.gz or .tgz to read it (local files are detected by their magic)"
    elif what.startswith("starts with bytes"):
        what += f"; {exc}"
    if getattr(stream, "compression", None):
        return TarFormatError(f"{stream.compression}-compressed, but what it holds is not a tar archive: {what}")
    return TarFormatError(f"not a tar archive: {what}")


def stream_size(stream: BinaryIO) -> Optional[int]:
    """The stream's total length in bytes when it is known (local files, mapped shards,
    object-store files with a size), else None (pipes, streamed HTTP, decompressed gzip)."""
    size = getattr(stream, "size", stream)
    if size is not stream:
        return size if isinstance(size, int) else None
    try:
        return os.fstat(stream.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None


def _pax_records(data: bytes, offset: int) -> Dict[bytes, bytes]:
    """PAX extended header records, ``"<length> <key>=<value>\\n"`` each, strictly parsed."""
    records: Dict[bytes, bytes] = {}
    position = 0
    while position < len(data) and data[position] != 0:  # some writers pad with NULs
        space = data.find(b" ", position, position + 24)
        length = data[position:space] if space > position else b""
        if not length.isdigit() or int(length) < 5 or position + int(length) > len(data) or data[position + int(length) - 1] != 0x0A:
            raise TarFormatError(f"malformed PAX extended header at offset {offset} (record at byte {position})")
        key, sep, value = data[space + 1 : position + int(length) - 1].partition(b"=")
        if not sep:
            raise TarFormatError(f"malformed PAX extended header at offset {offset} (record without '=')")
        records[key] = value
        position += int(length)
    return records


def _read_exact(read: Callable[[int], bytes], n: int, offset: int) -> bytes:
    data = read(n)
    if len(data) != n:
        raise TarFormatError(f"truncated tar: wanted {n} bytes at offset {offset}, got {len(data)}")
    return data


def _skip(stream: BinaryIO, n: int, offset: int) -> None:
    try:
        position = stream.seek(n, 1)
    except (OSError, AttributeError, ValueError):  # pipes and HTTP bodies: read and drop
        position = None
        while n > 0:
            chunk = stream.read(min(n, 1 << 20))
            if not chunk:
                raise TarFormatError(f"truncated tar: member data ends early at offset {offset}") from None
            n -= len(chunk)
    if position is not None and position < offset + n:  # streams that stop at their end (gzip)
        raise TarFormatError(f"truncated tar: member data ends early at offset {position}")


def iter_members(stream: BinaryIO, offset: int = 0, read_data: bool = True) -> Iterator[Tuple[str, bytes, int]]:
    """Yield ``(name, data, header_offset)`` for each regular file, from byte ``offset`` on.

    ``stream`` must already be positioned at ``offset`` (the caller seeks or skips). With
    ``read_data=False`` member data is skipped (seeked over) and ``data`` is empty. A stream
    with ``read_view`` (a mapped shard) gives member data without copying it. Raises
    ``TarFormatError`` at the first header, number, size or name that is not sound.
    """
    return _scan(stream, offset, read_data, False)


def iter_samples(stream: BinaryIO, offset: int = 0) -> Iterator[Tuple[str, Sample, int]]:
    """Yield ``(key, {ext: bytes}, next_offset)``; ``next_offset`` is where the following
    sample starts, so reading can resume there exactly. Members are grouped by
    ``split_name``; errors are those of ``iter_members``."""
    return _scan(stream, offset, True, True)


def split_name(name: str) -> Tuple[str, str]:
    """``"dir/key.ext.gz"`` -> ``("dir/key", "ext.gz")`` (webdataset's convention)."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def _archive_ended(stream: BinaryIO) -> None:
    """Tell a stream that wants to know (a shard being cached) that the archive was read whole."""
    ended = getattr(stream, "archive_ended", None)
    if ended is not None:
        ended()


def _scan(stream: BinaryIO, offset: int, read_data: bool, group: bool) -> Iterator[Tuple[str, Any, int]]:
    """Members (``group=False``) or samples (``group=True``): one loop, the hot path of every
    stream, so grouping runs inline rather than as a second generator over the first."""
    read = stream.read
    read_member = getattr(stream, "read_view", read)
    total = stream_size(stream)
    long_name: Optional[str] = None
    pax_size: Optional[int] = None
    extended = False  # inside a long-name / PAX record: it belongs to the member after it
    header_offset = offset
    key: Optional[str] = None  # the sample being grouped (group=True)
    sample: Sample = {}
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK or header == ZERO_BLOCK:
            if 0 < len(header) < BLOCK or (offset == 0 and not header):
                error = TarFormatError(f"truncated tar header at offset {offset}")
                raise _not_a_tar(header, stream, error) if offset == 0 else error
            _archive_ended(stream)  # the end marker, or an archive without one that ends cleanly
            if key is not None:
                # After the last sample: the end of the archive; a resumed reader finds nothing more.
                yield key, sample, _end_offset(stream)
            return
        # The size and checksum fields, parsed in C when they hold only octal digits, spaces and
        # NULs (int() rejects an inner space or NUL: the strict parse then names the fault).
        check_field = header[148:156]
        size_digits, check_digits = header[124:136].strip(b" \0"), check_field.strip(b" \0")
        try:
            if not (size_digits.isdigit() and check_digits.isdigit()):  # no sign, underscore, prefix
                raise ValueError
            size, stored = int(size_digits, 8), int(check_digits, 8)
        except ValueError:
            try:
                size, stored = _fields(header, offset)
            except TarFormatError as exc:
                raise _not_a_tar(header, stream, exc) if offset == 0 else exc
        if stored != (adler32(header[:256]) & 0xFFFF) + (adler32(header[256:]) & 0xFFFF) - (adler32(check_field) & 0xFFFF) + 255:
            error = _checksum_error(header, stored, offset)  # or an old writer's signed sum
            if error is not None:
                raise _not_a_tar(header, stream, error) if offset == 0 else error
        if pax_size is not None:
            size, pax_size = pax_size, None
        if not extended:
            header_offset = offset
        typeflag = header[156]
        extended = typeflag == _LONG_NAME or typeflag == _PAX
        if total is not None and offset + BLOCK + size > total:
            name = long_name or header[0:100].split(b"\0", 1)[0].decode("utf-8", "backslashreplace")
            raise TarFormatError(
                f"member {name} at offset {offset} declares {size} bytes, {max(total - offset - BLOCK, 0)} remain"
            )
        padded = (size + BLOCK - 1) & -BLOCK
        if read_data or extended:
            if padded <= _ONE_READ or read_member is not read:
                # Small members (and views, which cost nothing to slice): one read with the padding.
                data = read_member(padded)
                if len(data) != padded:
                    raise TarFormatError(f"truncated tar: wanted {padded} bytes at offset {offset + BLOCK}, got {len(data)}")
                if padded != size:
                    data = data[:size]
            else:
                # Read exactly the member (one copy), then drop the padding: slicing a padded
                # read would copy every large member a second time.
                data = _read_exact(read_member, size, offset + BLOCK)
                if padded > size:
                    _read_exact(read_member, padded - size, offset + BLOCK + size)
        else:
            _skip(stream, padded, offset + BLOCK)
            data = b""
        offset += BLOCK + padded
        if extended:
            if typeflag == _LONG_NAME:  # GNU long name for the next member
                long_name = _text(bytes(data).rstrip(b"\0"))
                continue
            records = _pax_records(bytes(data), offset - BLOCK - padded)  # PAX header for the next member
            if b"path" in records:
                long_name = _text(records[b"path"])
            if b"size" in records:
                if not records[b"size"].isdigit():
                    raise TarFormatError(f"PAX size {records[b'size']!r} at offset {offset - BLOCK - padded} is not a number")
                pax_size = int(records[b"size"])
            continue
        if typeflag not in _REGULAR:
            long_name = None
            continue  # directories, links, global headers: not sample data
        if long_name is not None:
            name, long_name = long_name, None
        else:
            try:
                name = header[:100].split(b"\0", 1)[0].decode()
            except UnicodeDecodeError:  # the fast decode above, or else _text
                name = _text(header[:100].split(b"\0", 1)[0])
            if header[345] and header[257:262] == b"ustar":  # a ustar name prefix
                name = _text(header[345:500].split(b"\0", 1)[0]) + "/" + name
        if not group:
            yield name, data, header_offset
            continue
        dot = name.find(".", name.rfind("/") + 1)  # split_name, inline
        member_key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1 :])
        if member_key != key:
            if key is not None:
                yield key, sample, header_offset
            key, sample = member_key, {}
        elif ext in sample:  # (webdataset refuses these too) one of the two would be lost unseen
            raise TarFormatError(f"member {name} at offset {header_offset} repeats a member of sample {key}")
        sample[ext] = data


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
