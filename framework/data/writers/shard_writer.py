"""Write samples into webdataset-compatible tar shards, modality-agnostic.

A sample is a key plus members ``{ext: bytes}``; each member becomes a tar entry
``{key}.{ext}``, which is how webdataset groups entries back into samples.
"""
from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path
from types import TracebackType
from typing import Any, Callable, Mapping

from framework.data.manifest import MANIFEST_NAME, write_manifest
from framework.errors import DataError

log = logging.getLogger(__name__)

_TAR_FORMAT = tarfile.GNU_FORMAT  # no 100-char name limit, no pax timestamps


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _final_tar_size(offset: int) -> int:
    # tarfile.close() appends two zero blocks, then pads the archive to a whole record.
    return _round_up(offset + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)


def find_existing_outputs(directory: str | os.PathLike[str], prefix: str = "shard") -> list[Path]:
    """Shards (final or half-written) and the manifest a previous write left in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = sorted(directory.glob(f"{prefix}-*.tar")) + sorted(directory.glob(f"{prefix}-*.tar.tmp"))
    if (directory / MANIFEST_NAME).exists():
        found.append(directory / MANIFEST_NAME)
    return found


def clear_existing_outputs(directory: str | os.PathLike[str], prefix: str = "shard", overwrite: bool = False) -> None:
    """Refuse (DataError) or, with ``overwrite``, delete a previous write's shards and manifest.

    Stale shards must not survive: a reader listing ``*.tar`` would mix old and new data.
    Only files this writer would create are deleted, never the directory itself.
    """
    existing = find_existing_outputs(directory, prefix)
    if not existing:
        return
    if not overwrite:
        raise DataError(
            f"output directory {directory} already contains {len(existing)} shard/manifest file(s) "
            f"(e.g. {existing[0].name}); choose another directory or pass overwrite (--overwrite) to replace them"
        )
    for path in existing:
        path.unlink()
    log.info("removed %d old shard/manifest file(s) from %s", len(existing), directory)


def _check_key(key: str) -> None:
    if not isinstance(key, str) or not key:
        raise ValueError(f"sample key must be a non-empty string, got {key!r}")
    if "." in key or "/" in key or "\\" in key or "\0" in key:
        # webdataset splits a member name at the first '.' into key and extension.
        raise ValueError(f"sample key must not contain '.', '/', '\\' or NUL: {key!r}")


class ShardWriter:
    """Context manager writing ``{prefix}-{index:06d}.tar`` shards plus a manifest into ``directory``.

    A new shard is started when the next sample would push the current one past
    ``max_samples`` samples or ``max_bytes`` bytes on disk (a single sample larger than
    ``max_bytes`` gets a shard of its own; samples are never split). Shards are written as
    ``<name>.tmp`` and renamed when complete; the manifest is written on a clean close
    only, so an interrupted write leaves no half shard under a final name and no manifest.

    ``shard_name`` maps the shard's index in this writer to its file name (default
    ``{prefix}-{index:06d}.tar``). With ``standalone=False`` the caller owns the directory:
    existing outputs are neither checked nor cleared and no manifest is written on close
    (the parallel driver merges several writers' shard lists into one manifest itself).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        modality: str,
        prefix: str = "shard",
        max_samples: int = 1000,
        max_bytes: int = 64 * 2**20,
        manifest_extra: dict[str, Any] | None = None,
        overwrite: bool = False,
        shard_name: Callable[[int], str] | None = None,
        standalone: bool = True,
    ) -> None:
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
        if not prefix or "/" in prefix:
            raise ValueError(f"bad shard prefix {prefix!r}")
        self.directory = Path(directory)
        self.modality = modality
        self.prefix = prefix
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        # Public and mutable so callers can add totals they only know at the end.
        self.manifest_extra: dict[str, Any] = dict(manifest_extra or {})
        self.shards: list[dict[str, Any]] = []
        self.closed = False
        self.standalone = standalone
        self._shard_name = shard_name or (lambda index: f"{prefix}-{index:06d}.tar")
        if standalone:
            clear_existing_outputs(self.directory, prefix, overwrite)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._file: io.BufferedWriter | None = None
        self._tar: tarfile.TarFile | None = None
        self._tmp_path: Path | None = None
        self._samples = 0  # in the current shard
        self._keys: set[str] = set()  # of the current shard: a repeated key would merge samples

    @property
    def total_samples(self) -> int:
        """Samples written so far, including the open shard."""
        return sum(s["samples"] for s in self.shards) + self._samples

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _member_infos(self, key: str, members: Mapping[str, bytes]) -> list[tuple[tarfile.TarInfo, bytes]]:
        out = []
        for ext, data in members.items():
            if not isinstance(ext, str) or not ext or "/" in ext:
                raise ValueError(f"bad member extension {ext!r} for key {key!r}")
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise ValueError(f"member {key}.{ext} must be bytes, got {type(data).__name__}")
            data = bytes(data)
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            # Fixed metadata so the same samples always give byte-identical shards.
            info.mtime = 0
            info.mode = 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.type = tarfile.REGTYPE
            out.append((info, data))
        return out

    def _entry_size(self, info: tarfile.TarInfo, data: bytes) -> int:
        header = info.tobuf(_TAR_FORMAT, "utf-8", "surrogateescape")
        return len(header) + _round_up(len(data), tarfile.BLOCKSIZE)

    def holds(self, key: str) -> bool:
        """Whether the shard being written has a sample ``key`` already."""
        return key in self._keys

    def current_shard(self) -> str:
        return self._shard_name(len(self.shards))

    def write(self, key: str, members: Mapping[str, bytes]) -> None:
        """Write one sample: tar members ``{key}.{ext}`` for each ``ext, data`` in ``members``."""
        if self.closed:
            raise ValueError("write() on a closed ShardWriter")
        _check_key(key)
        if not members:
            raise ValueError(f"sample {key!r} has no members")
        entries = self._member_infos(key, members)
        size = sum(self._entry_size(info, data) for info, data in entries)
        if self._tar is not None and self._samples > 0:
            full = self._samples + 1 > self.max_samples or _final_tar_size(self._tar.offset + size) > self.max_bytes
            if full:
                self._close_shard()
        if self._tar is None:
            self._open_shard()
        if key in self._keys:
            raise ValueError(f"duplicate sample key {key!r} in shard {self._tmp_path}")
        assert self._tar is not None
        for info, data in entries:
            self._tar.addfile(info, io.BytesIO(data))
        self._keys.add(key)
        self._samples += 1

    def _open_shard(self) -> None:
        name = self._shard_name(len(self.shards))
        self._tmp_path = self.directory / f"{name}.tmp"
        self._file = open(self._tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=_TAR_FORMAT, encoding="utf-8")
        self._samples = 0
        self._keys = set()

    def _close_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp_path is not None
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._tmp_path.with_suffix("")  # strip ".tmp"
        os.replace(self._tmp_path, final)
        self.shards.append({"path": final.name, "samples": self._samples, "bytes": final.stat().st_size})
        self._tar = self._file = self._tmp_path = None
        self._samples = 0
        self._keys = set()

    def close(self) -> None:
        """Finish the open shard and write the manifest. Idempotent."""
        if self.closed:
            return
        if self._tar is not None:
            self._close_shard()
        if self.standalone:
            write_manifest(self.directory, self.shards, self.modality, self.manifest_extra)
        self.closed = True

    def abort(self) -> None:
        """Drop the open (half-written) shard and skip the manifest; finished shards stay."""
        if self.closed:
            return
        self.closed = True
        try:
            if self._tar is not None:
                self._tar.close()
        except Exception:  # the shard is being thrown away; its close error does not matter
            pass
        if self._file is not None:
            self._file.close()
        if self._tmp_path is not None:
            self._tmp_path.unlink(missing_ok=True)
        self._tar = self._file = self._tmp_path = None
