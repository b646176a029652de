"""Resolve a shard spec from the config into a list of shards, and open a shard at an offset.

A spec is a string or a list of strings; each string is a directory of ``.tar`` shards
(its ``manifest.json`` supplies per-shard sample counts), a single ``.tar`` file, a brace
pattern (``shards-{000000..000099}.tar``) or a glob.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, List, Optional

from braceexpand import braceexpand

from framework.data.manifest import read_manifest
from framework.errors import DataError

_READ_BUFFER = 1 << 20


@dataclass(frozen=True)
class Shard:
    url: str
    samples: Optional[int] = None  # from the manifest, when there is one


def _as_list(spec: Any, key: str) -> List[str]:
    if spec is None or spec == "" or spec == []:
        raise DataError(f"{key} is empty: give a directory of .tar shards, a .tar file, a brace pattern or a glob")
    items = [spec] if isinstance(spec, str) else list(spec)
    for item in items:
        if not isinstance(item, str) or not item:
            raise DataError(f"{key}: {item!r} is not a shard path")
    return items


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


def resolve_shards(spec: Any, key: str = "data.train") -> List[Shard]:
    """Expand ``spec`` into shards, checking that each local one exists and is not empty."""
    shards: List[Shard] = []
    for item in _as_list(spec, key):
        if "://" in item or item.startswith("pipe:"):
            shards.extend(Shard(url) for url in braceexpand(item))
            continue
        path = Path(item).expanduser()
        if path.is_dir():
            shards.extend(_from_directory(path, key))
        elif "{" in item:
            shards.extend(Shard(p) for p in braceexpand(str(path)))
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(str(path), recursive=True))
            if not matches:
                raise DataError(f"{key}: glob {item!r} matches no shard")
            shards.extend(Shard(p) for p in matches)
        else:
            shards.append(Shard(str(path)))
    for shard in shards:
        if "://" in shard.url or shard.url.startswith("pipe:"):
            continue
        if not os.path.exists(shard.url):
            raise DataError(f"{key}: shard not found: {shard.url}")
        if os.path.getsize(shard.url) == 0:
            raise DataError(f"{key}: shard is empty (0 bytes): {shard.url}")
    return shards


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """Open a shard for reading, positioned at byte ``offset``."""
    if "://" in url or url.startswith("pipe:"):
        raise DataError(f"remote shard URLs are not supported yet: {url}")
    stream = open(url, "rb", buffering=_READ_BUFFER)
    if offset:
        stream.seek(offset)
    return stream
